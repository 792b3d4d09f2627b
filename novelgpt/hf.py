"""Hugging Face GPT-2 folders (GPT2-Chinese's model/final_model): read them into our GPT and write ours out.

Neither direction needs transformers: config.json is plain JSON and the weights are safetensors (one file or
shards with an index) or a torch state dict, read with weights_only (a checkpoint is data, never code).

    export_folder(model, tok, "exported", fmt="both")   # what export.py runs: transformers, pipeline() and
                                                        # GPT2-Chinese's generate.py read the folder
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from novelgpt.engine import SamplingSettings
from novelgpt.files import swap_in_folder
from model import GPT, GPTConfig
from novelgpt.tokenizer import DOC_END, DOC_START, Tokenizer

FORMATS = ("both", "bin", "safetensors")
# What an exported folder holds; a folder with anything else in it is not replaced.
EXPORT_FILES = ("config.json", "generation_config.json", "pytorch_model.bin", "model.safetensors", "vocab.txt",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# What a source folder says about its tokenizer that an export keeps (uer's tokenizer_class, for one)
CARRIED_KEYS = ("tokenizer_class", "do_lower_case", "tokenize_chinese_chars", "strip_accents")
TOP_K = SamplingSettings().top_k  # sample.py's default (GPT2-Chinese's), written into generation_config.json

# Hugging Face's GPT-2 uses Conv1D layers, which store their weight transposed relative to nn.Linear
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _read_hf_config(path: str) -> dict:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{path} has no config.json; expected a Hugging Face GPT-2 folder "
                         "(config.json + pytorch_model.bin or model.safetensors)")
    try:
        with open(config_file, encoding="utf-8") as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is damaged (not valid JSON: {e}); export the model again") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file} is damaged (not a JSON object); export the model again")
    if "n_positions" not in hf and "n_ctx" in hf:
        hf["n_positions"] = hf["n_ctx"]
    missing = [k for k in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd") if k not in hf]
    if missing:
        raise ValueError(f"{config_file} lacks {', '.join(missing)}; is this a GPT-2 config?")
    bad = [k for k in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")
           if not isinstance(hf[k], int) or isinstance(hf[k], bool) or not 0 < hf[k] < 2**31]
    if bad or hf["n_embd"] % hf["n_head"]:
        what = ", ".join(f"{k}={hf[k]!r}" for k in bad) or "n_embd is not a multiple of n_head"
        raise ValueError(f"{config_file} is damaged ({what}); export the model again")
    if hf.get("model_type", "gpt2") != "gpt2" or hf.get("activation_function", "gelu_new") not in \
            ("gelu_new", "gelu_pytorch_tanh") or hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"{config_file} describes a model other than plain GPT-2 (model_type, "
                         "activation_function or n_inner differ); it cannot be loaded")
    return hf


def _shard_names(path: str, index_name: str) -> list[str]:
    """The shard files an index (model.safetensors.index.json) names, in order, each checked to exist."""
    with open(os.path.join(path, index_name), encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        if os.path.basename(name) != name or not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"{index_name} names the shard {name}, which is not in the folder")
    return names


def _read_one(file: str) -> dict[str, torch.Tensor]:
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)  # data, never code to unpickle


def _read_hf_weights(path: str) -> dict[str, torch.Tensor]:
    try:
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return _read_one(os.path.join(path, name))
        # sharded: model-00001-of-00002.safetensors ... with an index saying which weight is where
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if os.path.isfile(os.path.join(path, index)):
                state = {}
                for shard in _shard_names(path, index):
                    state.update(_read_one(os.path.join(path, shard)))
                return state
    except ImportError:
        raise ValueError("reading model.safetensors needs the safetensors package: pip install safetensors") from None
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():  # a truncated or garbled file
            raise ValueError(f"cannot read the weights in {path}: they are damaged (they do not unpickle); export "
                             "or download the model again") from None
        # torch's message goes on to advise weights_only=False: never for such a file
        raise ValueError(f"cannot read the weights in {path}: the file holds pickled objects other than tensors "
                         "(code, perhaps), which are never loaded here; use a model.safetensors, or a "
                         "pytorch_model.bin of plain tensors") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"cannot read the weights in {path}: they are damaged ({first}); export or download the "
                         "model again") from None
    raise ValueError(f"{path} has neither model.safetensors nor pytorch_model.bin (nor a sharded index)")


def load_hf_gpt2(path: str, dropout: float = 0.0) -> GPT:
    """Load a Hugging Face GPT-2 folder (e.g. GPT2-Chinese's model/final_model) without transformers;
    dropout is the training setting to give it (a folder's own pdrop values are not ours to keep)."""
    hf = _read_hf_config(path)
    config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout, bias=True,
                       layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
    state = _read_hf_weights(path)
    # GPT2LMHeadModel prefixes "transformer.", a bare GPT2Model does not
    state = {(k if k.startswith("transformer.") or k == "lm_head.weight" else "transformer." + k): v
             for k, v in state.items()}
    # the causal-mask buffers of older transformers versions are not weights
    state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    lm_head = state.pop("lm_head.weight", None)
    model = GPT(config)
    ours = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    unknown, missing = sorted(set(state) - set(ours)), sorted(set(ours) - set(state))
    if unknown or missing:
        raise ValueError(f"{path} is not a GPT-2 checkpoint we can load: unknown weights {unknown[:3]}, "
                         f"missing weights {missing[:3]}")
    with torch.no_grad():
        for k, target in ours.items():
            w = state[k].t() if k.endswith(_CONV1D) else state[k]  # Conv1D stores (in, out)
            if w.shape != target.shape:
                raise ValueError(f"{path}: {k} has shape {tuple(w.shape)} but config.json implies "
                                 f"{tuple(target.shape)}; config.json and the weights do not match")
            target.copy_(w)
        if lm_head is not None and not torch.equal(lm_head.to(model.lm_head.weight.dtype), model.lm_head.weight):
            raise ValueError(f"{path}: lm_head.weight differs from the token embedding; only GPT-2 "
                             "with tied embeddings is supported")
    for k, w in model.state_dict().items():
        if w.is_floating_point() and not torch.isfinite(w).all():
            raise ValueError(f"{path} is damaged: {int((~torch.isfinite(w)).sum()):,} weight(s) of {k} are NaN or "
                             "infinite; export the model again")
    return model


# ------------------------------------------------------------------ a folder's vocabulary

def folder_metadata(path: str) -> dict:
    """The tokenizer settings of a Hugging Face folder worth keeping (CARRIED_KEYS), from tokenizer_config.json
    and config.json (uer writes tokenizer_class into config.json)."""
    found = {}
    for name in ("config.json", "tokenizer_config.json"):  # the tokenizer's own file wins
        try:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                settings = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(settings, dict):
            found.update({k: settings[k] for k in CARRIED_KEYS if k in settings})
    return found


def _doc_markers(path: str, itos: list[str], metadata: dict) -> tuple[str, str]:
    """How the folder's model wraps a document: config.json's bos/eos ids when they are real ids; else uer's
    [CLS] ... [SEP] for a folder that names BertTokenizer (uer's hub models), else GPT2-Chinese's [MASK] ... [CLS]."""
    try:
        hf = _read_hf_config(path)
    except ValueError:
        hf = {}
    bos, eos = hf.get("bos_token_id"), hf.get("eos_token_id")
    if all(isinstance(i, int) and 0 <= i < len(itos) and itos[i].startswith("[") for i in (bos, eos)):
        return itos[bos], itos[eos]
    if metadata.get("tokenizer_class") == "BertTokenizer" and "\n" not in itos:
        return "[CLS]", "[SEP]"
    return DOC_START, DOC_END


def folder_tokenizer(path: str, vocab: str = "") -> Tokenizer | None:
    """The vocabulary of a Hugging Face folder (vocab, else its vocab.txt) with its document markers and
    metadata; None when it has no vocab.txt and none is given. A bad vocab file raises ValueError or OSError."""
    if not vocab and not os.path.isfile(os.path.join(path, "vocab.txt")):
        return None
    vocab = vocab or os.path.join(path, "vocab.txt")
    itos = Tokenizer.from_vocab_file(vocab).itos
    metadata = folder_metadata(path)
    return Tokenizer(itos, *_doc_markers(path, itos, metadata), hf_metadata=metadata)


# ------------------------------------------------------------------ export

def hf_config_dict(model: GPT, tok: Tokenizer) -> dict:
    """config.json: a plain GPT-2 with our vocabulary's real bos/eos/pad ids (not GPT-2's 50256)."""
    cfg = model.config
    config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
                  n_positions=cfg.block_size, n_ctx=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                  n_head=cfg.n_head, n_inner=None, activation_function="gelu_new",
                  layer_norm_epsilon=cfg.layer_norm_epsilon, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                  attn_pdrop=cfg.dropout, initializer_range=0.02, tie_word_embeddings=True,
                  bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    if tok.wordpiece and "tokenizer_class" in tok.hf_metadata:
        config["tokenizer_class"] = tok.hf_metadata["tokenizer_class"]
    return config


def generation_config_dict(tok: Tokenizer) -> dict:
    """generation_config.json: sample as sample.py does by default (top-k 8), stop at the end token."""
    return dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, do_sample=True,
                top_k=TOP_K)


def char_tokenizer_json(tok: Tokenizer) -> dict:
    """tokenizer.json (the `tokenizers` format) for our character vocabulary: every character is a token (newline,
    space and U+3000 included), nothing is normalized except what our encoder does itself, and decoding joins
    the characters."""
    specials = [t for t in tok.itos if tok.stoi[t] in (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id)]
    added = [dict(id=tok.stoi[t], content=t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                  special=True) for t in specials]
    # our encoder's one normalization: an upper-case letter missing from the vocabulary reads as its lower case
    folds = {}
    for t in tok.itos:
        if len(t) == 1 and len(t.upper()) == 1 and t.upper() != t and t.upper() not in tok.stoi:
            folds[t.upper()] = t
    normalizer = {"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"String": upper}, "content": lower} for upper, lower in folds.items()]}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": normalizer if folds else None,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated",
                              "invert": False},
            "post_processor": None, "decoder": {"type": "Fuse"},
            "model": {"type": "WordLevel", "vocab": tok.stoi, "unk_token": "[UNK]"}}


def tokenizer_files(tok: Tokenizer, block_size: int) -> dict[str, str]:
    """vocab.txt, tokenizer_config.json, special_tokens_map.json and, for our character vocabulary, tokenizer.json.
    A BERT vocabulary (GPT2-Chinese, uer) stays a BertTokenizer, which reads its vocab.txt exactly."""
    specials = dict(unk_token="[UNK]", pad_token=tok.itos[tok.pad_id], bos_token=tok.doc_start,
                    eos_token=tok.doc_end, sep_token="[SEP]", cls_token="[CLS]", mask_token="[MASK]")
    config = dict(specials, model_max_length=block_size, clean_up_tokenization_spaces=False)
    files = {"vocab.txt": tok.vocab_file_text(), "special_tokens_map.json": json.dumps(specials, indent=2)}
    if tok.wordpiece:
        config.update({"tokenizer_class": "BertTokenizer", "do_lower_case": True, **tok.hf_metadata})
    else:
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        files["tokenizer.json"] = json.dumps(char_tokenizer_json(tok), ensure_ascii=False)
    files["tokenizer_config.json"] = json.dumps(config, ensure_ascii=False, indent=2)
    return files


def _export_weights(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict in Hugging Face's layout: Conv1D weights transposed, lm_head left out (tied on load)."""
    return {k: (v.t() if k.endswith(_CONV1D) else v).detach().float().cpu().contiguous()
            for k, v in model.state_dict().items() if k != "lm_head.weight"}


def check_export_target(folder: Path) -> None:
    """Refuse to replace anything but an exported folder (it is replaced whole)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder; choose another output folder")
    stray = sorted(p.name for p in folder.iterdir() if p.name not in EXPORT_FILES) if folder.is_dir() else []
    if stray:
        raise ValueError(f"{folder} holds files an export does not write ({', '.join(stray[:5])}); it is replaced "
                         "whole, so choose an empty or new folder")


def export_folder(model: GPT, tok: Tokenizer, folder: str | Path, fmt: str = "both") -> list[str]:
    """Write model and tokenizer as a Hugging Face GPT-2 folder that transformers (from_pretrained, AutoTokenizer,
    pipeline) and GPT2-Chinese's generate.py (pytorch_model.bin) read; fmt: both, bin or safetensors.
    The folder is written beside the target and swapped in whole. Returns the file names written."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not model.config.bias:
        raise ValueError("Hugging Face GPT-2 has biases; a model with bias=False cannot be exported")
    if model.config.vocab_size != tok.vocab_size:
        raise ValueError(f"the model has {model.config.vocab_size} tokens but its vocabulary {tok.vocab_size}")
    folder = Path(folder)
    if folder.is_symlink():  # replace what the link points to, never the link itself
        folder = Path(os.path.realpath(folder))
    check_export_target(folder)
    texts = {"config.json": json.dumps(hf_config_dict(model, tok), indent=2),
             "generation_config.json": json.dumps(generation_config_dict(tok), indent=2),
             **tokenizer_files(tok, model.config.block_size)}
    state = _export_weights(model)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        if fmt in ("both", "safetensors"):
            from safetensors.torch import save_file
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if fmt in ("both", "bin"):
            # the pre-1.6 format: the old torch under GPT2-Chinese's transformers 2.x reads it, and so does today's
            torch.save(state, tmp / "pytorch_model.bin", _use_new_zipfile_serialization=False)
        if folder.is_dir():
            check_export_target(folder)  # again, just before replacing it
            shutil.rmtree(swap_in_folder(tmp, folder), ignore_errors=True)
        else:
            os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(p.name for p in folder.iterdir())
