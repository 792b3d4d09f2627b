"""Checkpoints: the one format train.py writes, and the one loader every script uses.

A checkpoint (.pt) is a dict of tensors and plain data, read with torch.load(weights_only=True):
    model_args  GPTConfig fields              model       state dict (weights)
    vocab       Tokenizer.to_meta()           config      the training settings (dataset, data_dir, ...)
    iter_num, best_val_loss                   and, in last.pt only, what resume needs: optimizer, scaler, rng
The vocabulary carries its fingerprint (a hash of the token list). check_vocab is the one place where a
model's vocabulary is compared with a dataset's or a vocab file's: token by token, never by size.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from configurator import UserError
from novelgpt.hf import folder_tokenizer, load_hf_gpt2
from model import GPT
from novelgpt.tokenizer import Tokenizer

if TYPE_CHECKING:
    from novelgpt.dataset import Dataset

TRAIN_COMMAND = "python train.py config/novel_cpu.py"


def checkpoint_state(model: GPT, tok: Tokenizer, config: dict, iter_num: int, best_val_loss: float) -> dict:
    """What ckpt.pt holds: enough to rebuild the model and its tokenizer, nothing to unpickle."""
    return {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config), "vocab": tok.to_meta(),
            "config": config, "iter_num": iter_num, "best_val_loss": best_val_loss}


def read_checkpoint(path: str | Path) -> dict:
    """torch.load a checkpoint as data; a damaged or foreign file is a one-line UserError."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except Exception:  # truncated, not a zip, pickled code, ...: torch's own advice (weights_only=False) is unsafe
        raise UserError(f"cannot load {path}: it is damaged (corrupt or was not written by train.py; code in it is "
                        "never run); use another checkpoint or train again") from None
    missing = [k for k in ("model", "model_args", "vocab") if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise UserError(f"{path} is not a checkpoint written by train.py (it has no {', '.join(missing)})")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, path: str | Path) -> tuple[GPT, Tokenizer]:
    """The GPT and Tokenizer stored in a checkpoint dict."""
    try:
        model = GPT.from_state_dict(checkpoint["model_args"], checkpoint["model"])
        tok = Tokenizer.from_meta(checkpoint["vocab"])
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"cannot load the model in {path}: it is damaged ({first}); use another checkpoint or "
                        "train again") from None
    if model.config.vocab_size != tok.vocab_size:
        raise UserError(f"{path} is damaged: its model has {model.config.vocab_size} tokens but its vocabulary "
                        f"{tok.vocab_size}; use another checkpoint or train again")
    check_finite(model, str(path), "use another checkpoint or train again")
    return model, tok


def check_finite(model: torch.nn.Module, name: str, fix: str) -> None:
    """Refuse a model with a NaN or infinite weight (it could only ever generate garbage or fail to sample)."""
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"{name} is damaged: {bad:,} weight(s) of {key} are NaN or infinite; {fix}")


def vocab_from_file(path: str) -> Tokenizer:
    """A vocab.txt (ours or GPT2-Chinese's), with one-line errors."""
    try:
        return Tokenizer.from_vocab_file(path)
    except FileNotFoundError:
        raise UserError(f"vocab file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot use {path} as a vocab file: {e}") from None


def vocab_difference(a: Tokenizer, b: Tokenizer) -> str | None:
    """None when both give every id the same token; else the first difference, in a few words."""
    if a.itos == b.itos:
        return None
    for i, (x, y) in enumerate(zip(a.itos, b.itos)):
        if x != y:
            return f"first difference at id {i}: {y!r} against {x!r}"
    return f"{b.vocab_size:,} tokens against {a.vocab_size:,}"  # the other's first, as in the id case


def check_vocab(model_tok: Tokenizer, model_name: str, other: Tokenizer, other_name: str, fix: str) -> None:
    """Refuse, in one line that says how to fix it, a vocabulary that is not the model's token for token."""
    difference = vocab_difference(model_tok, other)
    if difference:
        raise UserError(f"the vocabulary of {other_name} does not match {model_name}'s ({difference}; fingerprints "
                        f"{other.fingerprint} and {model_tok.fingerprint}): {fix}")


def fine_tune_vocab(folder: str, dataset: "Dataset") -> Tokenizer:
    """The vocabulary to train a Hugging Face folder's model on dataset with: the dataset's, once checked to
    be the folder's (its vocab.txt), carrying the folder's metadata (tokenizer_class) on."""
    data_tok = dataset.tokenizer
    try:
        model_tok = folder_tokenizer(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the vocabulary of {folder}: {e}") from None
    if model_tok is None:
        source = dataset.meta.get("vocab_source", "built")
        if source == "built":
            raise UserError(f"{folder} has no vocab.txt, and {dataset.folder} has a vocabulary built from its text, "
                            f"which the model cannot know: {dataset.prepare_command('<the model vocab.txt>')}")
        print(f"note: {folder} has no vocab.txt; taking {source}, which {dataset.folder} was prepared with, "
              "as the model's vocabulary", file=sys.stderr)
        return data_tok
    command = dataset.prepare_command(os.path.join(folder, "vocab.txt"))
    check_vocab(model_tok, folder, data_tok, str(dataset.folder), command)
    return data_tok.with_settings(hf_metadata=model_tok.hf_metadata or data_tok.hf_metadata)


def _load_hf_folder(folder: str, vocab: str) -> tuple[GPT, Tokenizer]:
    if not vocab and not os.path.isfile(os.path.join(folder, "vocab.txt")):
        raise UserError(f"{folder} has no vocab.txt; give its vocabulary with --vocab "
                        "(GPT2-Chinese: --tokenizer_path cache/vocab_small.txt)")
    try:
        tok = folder_tokenizer(folder, vocab)
        own = folder_tokenizer(folder) if vocab else None
    except FileNotFoundError:
        raise UserError(f"vocab file not found: {vocab}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot use the vocabulary of {folder}: {e}") from None
    if own is not None:
        check_vocab(own, folder, tok, vocab, "leave --vocab out: the folder's vocab.txt is its vocabulary")
    try:
        model = load_hf_gpt2(folder)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None
    if tok.vocab_size != model.config.vocab_size:
        raise UserError(f"{vocab or folder} has {tok.vocab_size} tokens but the model in {folder} has "
                        f"{model.config.vocab_size}; give the vocab file it was trained with")
    return model, tok


def resolve_source(source: str, newest_fallback: bool = False) -> str:
    """The file or folder a model source names: a HF folder, a .pt file, or a run folder's ckpt.pt
    (its last.pt, said aloud, when training has not saved a best checkpoint yet). newest_fallback: when
    source holds none, take the newest out*/ckpt.pt here, said aloud (configs write to out-<name>/)."""
    if os.path.isfile(os.path.join(source, "config.json")) or os.path.isfile(source):
        return source
    best, latest = os.path.join(source, "ckpt.pt"), os.path.join(source, "last.pt")
    if os.path.isfile(best):
        return best
    if os.path.isfile(latest):
        print(f"note: {best} not found; using the latest checkpoint, {latest}", file=sys.stderr)
        return latest
    runs = sorted((str(p) for p in Path(".").glob("out*/ckpt.pt")), key=os.path.getmtime)
    if newest_fallback and runs:
        print(f"note: no checkpoint in {source}; using {runs[-1]}, the newest here (choose with --out_dir)",
              file=sys.stderr)
        return runs[-1]
    hint = (f"found {', '.join(runs[-3:])}: pass --out_dir {os.path.dirname(runs[-1])}" if runs else
            f"train one with `{TRAIN_COMMAND}` and pass its out_dir as --out_dir")
    raise UserError(f"no checkpoint at {best}; {hint} (or --init_from a GPT2-Chinese model folder)")


class LoadedModel(NamedTuple):
    """What load_model returns; a checkpoint file is read once for all three."""
    model: GPT
    tokenizer: Tokenizer
    metadata: dict  # a .pt's entries but the weights (config: the training settings, iter_num...); {} for a folder


def load_model(source: str, vocab: str = "", device: str = "cpu", dtype: torch.dtype = torch.float32,
               newest_fallback: bool = False) -> LoadedModel:
    """The model, tokenizer and metadata of a run folder (its ckpt.pt), a .pt file, or a HF / GPT2-Chinese
    folder, the model in eval mode on device. vocab: the vocab.txt of a folder without one; for a .pt it must
    match. Quantising (quant.py) is the caller's choice."""
    path = resolve_source(source, newest_fallback)
    metadata: dict = {}
    if os.path.isdir(path):
        model, tok = _load_hf_folder(path, vocab)
    else:
        checkpoint = read_checkpoint(path)
        model, tok = model_from_checkpoint(checkpoint, path)
        metadata = {key: value for key, value in checkpoint.items() if key != "model"}
        if vocab:
            check_vocab(tok, path, vocab_from_file(vocab), vocab,
                        "leave --vocab out: the checkpoint carries its own vocabulary")
    return LoadedModel(model.eval().to(device=device, dtype=dtype), tok, metadata)
