"""Hugging Face GPT-2 folders (GPT2-Chinese's model/final_model): read them into our GPT and write ours out.

Neither direction needs transformers: config.json is plain JSON and the weights are safetensors or a
torch state dict, read with weights_only (a checkpoint is data, never code to unpickle).
"""

import json
import os

import torch

from model import GPT, GPTConfig

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
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    if "n_positions" not in hf and "n_ctx" in hf:
        hf["n_positions"] = hf["n_ctx"]
    missing = [k for k in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd") if k not in hf]
    if missing:
        raise ValueError(f"{config_file} lacks {', '.join(missing)}; is this a GPT-2 config?")
    if hf.get("model_type", "gpt2") != "gpt2" or hf.get("activation_function", "gelu_new") not in \
            ("gelu_new", "gelu_pytorch_tanh") or hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"{config_file} describes a model other than plain GPT-2 (model_type, "
                         "activation_function or n_inner differ); it cannot be loaded")
    return hf


def _read_hf_weights(path: str) -> dict[str, torch.Tensor]:
    safetensors_file, bin_file = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    try:
        if os.path.isfile(safetensors_file):
            from safetensors.torch import load_file
            return load_file(safetensors_file)
        if os.path.isfile(bin_file):
            # weights_only: a checkpoint is data, never code to unpickle
            return torch.load(bin_file, map_location="cpu", weights_only=True)
    except ImportError:
        raise ValueError("reading model.safetensors needs the safetensors package: pip install safetensors") from None
    except Exception as e:
        raise ValueError(f"cannot read the weights in {path}: {str(e).splitlines()[0]}") from None
    raise ValueError(f"{path} has neither model.safetensors nor pytorch_model.bin")


def save_hf_gpt2(model: GPT, path: str, safe_serialization: bool = True) -> None:
    """Write model as a Hugging Face GPT-2 folder: config.json + model.safetensors (or pytorch_model.bin)."""
    cfg = model.config
    if not cfg.bias:
        raise ValueError("Hugging Face GPT-2 has biases; a model with bias=False cannot be exported")
    hf_config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
                     n_positions=cfg.block_size, n_ctx=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_inner=None, activation_function="gelu_new",
                     layer_norm_epsilon=cfg.layer_norm_epsilon, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                     attn_pdrop=cfg.dropout, initializer_range=0.02, tie_word_embeddings=True)
    # lm_head.weight is left out: it is the token embedding, and Hugging Face re-ties it on load
    state = {k: (v.t() if k.endswith(_CONV1D) else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    os.makedirs(path, exist_ok=True)
    weights_name = "model.safetensors" if safe_serialization else "pytorch_model.bin"
    # write to temporary names and rename, so an interrupted save never leaves a half-written folder
    tmp = os.path.join(path, weights_name + ".tmp")
    if safe_serialization:
        from safetensors.torch import save_file
        save_file(state, tmp, metadata={"format": "pt"})
    else:
        torch.save(state, tmp)
    with open(os.path.join(path, "config.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    os.replace(tmp, os.path.join(path, weights_name))
    os.replace(os.path.join(path, "config.json.tmp"), os.path.join(path, "config.json"))


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
    return model
