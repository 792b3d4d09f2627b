"""
GPT-2, written out in one file, numerically the same model as Hugging Face's GPT2LMHeadModel.

Because it is exactly GPT-2, a GPT2-Chinese checkpoint folder (config.json + pytorch_model.bin or
model.safetensors) loads with GPT.from_hf_gpt2 and a model trained here goes back with save_hf_gpt2;
neither needs transformers. Generation keeps a key/value cache so each new token costs one token's work.
"""

import json
import math
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 512  # positions the model can see (n_positions in a Hugging Face config)
    vocab_size: int = 13317  # GPT2-Chinese's vocab_small.txt
    n_layer: int = 10
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2
    layer_norm_epsilon: float = 1e-5


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        # Filled by GPT.setup_cache: (B, n_head, block_size, head_size). Buffers rather than plain
        # attributes so a compiled decode step sees fixed addresses (CUDA graphs need that).
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """pos None: plain causal attention. Otherwise x's keys/values go to the cache at pos and
        either pos = 0..T-1 (prefill) or T = 1 and the query attends to the cache up to pos."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if pos is None:
            # flash attention on CUDA, the fused flash kernel on CPU
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            self.k_cache.index_copy_(2, pos, k.to(self.k_cache.dtype))
            self.v_cache.index_copy_(2, pos, v.to(self.v_cache.dtype))
            if T > 1:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                # one query against the whole preallocated cache, the slots not written yet masked: the
                # shapes never change, so one compiled graph serves every position. Written out because
                # for a single bf16 query the fused CPU kernel is several times slower than this.
                visible = torch.arange(self.k_cache.size(2), device=x.device) <= pos
                att = (q @ self.k_cache.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
                att = att.masked_fill(~visible, float("-inf")).float().softmax(dim=-1)
                y = att.to(q.dtype) @ self.v_cache
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's GELU is the tanh approximation ("gelu_new" in Hugging Face)
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections so the residual stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out the position embeddings (the token ones are the LM head)."""
        n_params = sum(p.numel() for p in self.parameters())
        return n_params - self.transformer.wpe.weight.numel() if non_embedding else n_params

    def _hidden(self, idx: torch.Tensor, pos: torch.Tensor, cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, cache_pos)
        return self.transformer.ln_f(x)

    def _check_ids(self, idx: torch.Tensor) -> None:
        V = self.config.vocab_size
        # skipped while compiling: a data-dependent check would split the compiled graph
        if not torch.compiler.is_compiling() and idx.numel() and (idx.min() < 0 or idx.max() >= V):
            raise ValueError(f"token ids must be in [0, {V}) but got {idx.min().item()}..{idx.max().item()}; "
                             "was the text encoded with this model's vocabulary?")

    def forward(self, idx: torch.Tensor,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> (logits, loss); without targets only the last position's logits, (B, 1, V)."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}; "
                             f"crop it to the last {self.config.block_size} tokens")
        self._check_ids(idx)
        x = self._hidden(idx, torch.arange(T, device=idx.device))
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                             device_type: str) -> torch.optim.AdamW:
        """AdamW decaying the matrices and embeddings only (not biases, not LayerNorm); fused where possible."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type in ("cuda", "cpu")  # one kernel for all parameters instead of a loop of ops
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused or None)

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, peak_flops: float | None = None) -> float:
        """Model FLOPs utilization of one iteration of dt seconds against peak_flops (default: this
        CUDA device's entry in PEAK_BF16_FLOPS); nan when the peak is unknown."""
        if peak_flops is None and torch.cuda.is_available():
            peak_flops = peak_flops_for(torch.cuda.get_device_name())
        if peak_flops is None:
            return float("nan")
        # PaLM appendix B: 6 FLOPs per parameter per token, plus attention's
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * self.get_num_params() + 12 * L * H * Q * T
        return flops_per_token * T * fwdbwd_per_iter / dt / peak_flops

    # ------------------------------------------------------------------ Hugging Face GPT-2 folders

    @classmethod
    def from_hf_gpt2(cls, path: str) -> "GPT":
        """Load a Hugging Face GPT-2 folder (e.g. GPT2-Chinese's model/final_model) without transformers."""
        hf = _read_hf_config(path)
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0, bias=True,
                           layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
        state = _read_hf_weights(path)
        # GPT2LMHeadModel prefixes "transformer.", a bare GPT2Model does not
        state = {(k if k.startswith("transformer.") or k == "lm_head.weight" else "transformer." + k): v
                 for k, v in state.items()}
        # the causal-mask buffers of older transformers versions are not weights
        state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        lm_head = state.pop("lm_head.weight", None)
        model = cls(config)
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

    # ------------------------------------------------------------------ generation

    def setup_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        """Allocate the key/value cache at full size, once; kept while batch size, device and dtype stay."""
        cfg = self.config
        shape = (batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        for block in self.transformer.h:
            attn = block.attn
            if attn.k_cache is None or attn.k_cache.shape != shape or attn.k_cache.device != device \
                    or attn.k_cache.dtype != dtype:
                attn.k_cache = torch.zeros(shape, device=device, dtype=dtype)
                attn.v_cache = torch.zeros(shape, device=device, dtype=dtype)

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, T) through in one pass, filling cache slots 0..T-1; returns (B, V) logits.
        Apart from decode_step so that a compiled decode_step never sees the prompt's varying length."""
        pos = torch.arange(idx.size(1), device=idx.device)
        return self.lm_head(self._hidden(idx, pos, cache_pos=pos)[:, -1, :]).float()

    def decode_step(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per row, idx (B, 1) at position pos (a 1-element LongTensor); returns (B, V) logits.

        All shapes are fixed, so it compiles once per batch size: `model.decode_step = torch.compile(
        model.decode_step, mode="reduce-overhead")` (CUDA graphs) makes generate use the compiled step;
        compile_decode does that with the best settings for the device.
        """
        return self.lm_head(self._hidden(idx, pos, cache_pos=pos)[:, -1, :]).float()

    def compile_decode(self) -> None:
        """Compile decode_step, which generate then uses: CUDA graphs on a GPU; on a CPU the weights are
        frozen into the graph, prepacked for oneDNN. Call it once the weights are final; the first
        generate call compiles (seconds to a minute), and each new batch size compiles again."""
        if self.lm_head.weight.is_cuda:
            self.decode_step = torch.compile(self.decode_step, mode="reduce-overhead", dynamic=False)
        else:
            self.decode_step = torch.compile(self.decode_step, dynamic=False, options={"freezing": True})

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                        banned_ids: Sequence[int] = (), stop_ids: Sequence[int] = (),
                        generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield a (B,) LongTensor per step: each row's new token, -1 once the row has produced a stop id.

        Ends when every row has stopped or after max_new_tokens. Past block_size the window slides:
        the last block_size // 2 tokens are kept and the cache rebuilt from them. For speed on a CPU,
        convert the model to bfloat16 (decoding reads every weight once per token) and compile_decode.
        """
        B, V, block_size = idx.size(0), self.config.vocab_size, self.config.block_size
        if idx.size(1) == 0:
            raise ValueError("the prompt must have at least one token")
        if temperature < 0 or repetition_penalty <= 0 or (top_k is not None and top_k < 1) \
                or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError("sampling needs temperature >= 0, repetition_penalty > 0, top_k >= 1, 0 < top_p <= 1")
        self._check_ids(idx)
        window = idx[:, -block_size:]
        if max_new_tokens <= 0:
            return
        self.setup_cache(B, idx.device, self.lm_head.weight.dtype)
        seen = torch.zeros(B, V, dtype=torch.bool, device=idx.device)
        seen.scatter_(1, idx, True)
        banned = torch.tensor(list(banned_ids), dtype=torch.long, device=idx.device)
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=idx.device)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        logits = self.prefill(window)
        for step in range(max_new_tokens):
            token = sample_next(logits, seen, temperature, top_k, top_p, repetition_penalty, banned, generator)
            yield torch.where(finished, -1, token)
            finished |= torch.isin(token, stops)
            if step == max_new_tokens - 1 or finished.all():
                return
            seen.scatter_(1, token[:, None], True)
            n_cached = window.size(1)
            window = torch.cat([window, token[:, None]], dim=1)
            if n_cached == block_size:  # no free slot: keep the recent half and rebuild the cache
                window = window[:, -max(1, block_size // 2):]
                logits = self.prefill(window)
            else:
                logits = self.decode_step(token[:, None], torch.tensor([n_cached], device=idx.device))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float = 1.0, banned_ids: Sequence[int] = (),
                 stop_ids: Sequence[int] = (), generator: torch.Generator | None = None) -> torch.Tensor:
        """Like generate_stream, but returns the prompt followed by the new tokens, (B, T + steps)."""
        steps = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                          banned_ids, stop_ids, generator))
        return torch.cat([idx, torch.stack(steps, dim=1)], dim=1) if steps else idx


def sample_next(logits: torch.Tensor, seen: torch.Tensor, temperature: float, top_k: int | None,
                top_p: float | None, repetition_penalty: float, banned: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from (B, V) logits; seen (B, V) marks tokens already in each row's context."""
    if repetition_penalty != 1.0:
        # make a seen token less likely whatever the sign of its logit (dividing a negative one would raise it)
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if banned.numel():
        logits = logits.index_fill(1, banned, float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None:
        # keep the smallest set of best tokens whose probability reaches top_p (always at least one)
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # never the best token, as top_p > 0
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# Peak dense bf16 tensor FLOP/s with fp32 accumulate (the mode autocast trains in), matched as a
# substring of torch.cuda.get_device_name(); first match wins, so specific names come first.
PEAK_BF16_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("A100", 312e12), ("A10G", 70e12), ("L4", 121e12),
    ("RTX 4090", 165e12), ("RTX 4080", 97.5e12), ("RTX 4070 Laptop", 36e12), ("RTX 4070", 58e12),
    ("RTX 4060 Laptop", 29e12), ("RTX 4060 Ti", 44e12), ("RTX 4060", 30e12),
    ("RTX 3090", 71e12), ("RTX 3080", 59.5e12), ("RTX 3070", 40.6e12),
    ("RTX 3060 Laptop", 26e12), ("RTX 3060 Ti", 32.4e12), ("RTX 3060", 25.5e12),
]


def peak_flops_for(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU named as torch.cuda.get_device_name says; None if not in the table."""
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device_name.lower():
            return flops
    return None


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
