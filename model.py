"""
GPT-2, written out in one file, numerically the same model as Hugging Face's GPT2LMHeadModel.

Because it is exactly GPT-2, GPT2-Chinese folders load (hf.py) and models trained here go back to
transformers. For generation, forward takes a KVCache: each new token then costs one token's work.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 512  # positions the model can see (n_positions in a Hugging Face config)
    vocab_size: int = 13317  # GPT2-Chinese vocab_small.txt's size (novelgpt.tokenizer.DEFAULT_VOCAB_SIZE)
    n_layer: int = 10
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2
    layer_norm_epsilon: float = 1e-5


class KVCache:
    """Keys and values of every layer for generation, preallocated at full length once.

    k, v: (n_layer, B, n_head, block_size, head_size). The shapes never change while a row grows, so one
    compiled decode graph serves every position; slots past a query's position are masked, not sliced."""

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device | str, dtype: torch.dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slots = torch.arange(config.block_size, device=device)  # (S,)
        # Slots attention reads. None: all of them, masked past each query, for one compiled graph; an eager
        # step sets the filled length (reading all 512 slots took 8.7 of 45 ms per int8 step on a CPU).
        self.limit: int | None = None
        if self.k.is_cuda:  # fixed addresses let CUDA graphs keep the cache in place instead of copying it
            for t in (self.k, self.v, self.slots):
                torch._dynamo.mark_static_address(t)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_head, T, hs) at slots pos (T,); return the layer's cache (B, n_head, S, hs), its
        first `limit` slots when limit is set."""
        keys, values = self.k[layer], self.v[layer]
        keys.index_copy_(2, pos, k.to(keys.dtype))
        values.index_copy_(2, pos, v.to(values.dtype))
        if self.limit is not None:
            return keys[:, :, :self.limit], values[:, :, :self.limit]
        return keys, values


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: KVCache | None = None, layer: int = 0
                ) -> torch.Tensor:
        """x (B, T, C) at positions pos (T,). Without a cache, plain causal attention over x; with one,
        x's keys/values go into the cache at pos and each query attends to the cache up to its position."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is None:
            # flash attention on CUDA, the fused flash kernel on CPU
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            keys, values = cache.update(layer, pos, k, v)  # (B, nh, S, hs)
            if T == 1 and cache.limit is not None:
                # one query over the filled slots (an eager step) sees them all: no mask, so the fused kernel;
                # on a CPU it was 2x faster than the written-out form in fp32, 10x in bf16
                y = F.scaled_dot_product_attention(q, keys, values)  # (B, nh, 1, hs)
            else:
                att = (q @ keys.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, S)
                visible = cache.slots[None, :keys.size(2)] <= pos[:, None]  # (T, S)
                att = att.masked_fill(~visible, float("-inf")).float().softmax(dim=-1)
                y = att.to(q.dtype) @ values  # (B, nh, T, hs)
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

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: KVCache | None = None, layer: int = 0
                ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), pos, cache, layer)
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
        # Set by train_head_on: (U+1,) the head rows training scores, their bias and (V+1,) each token's column.
        # Plain attributes, not buffers: DDP would broadcast buffers before every step, and checkpoints skip them.
        self.head_rows: torch.Tensor | None = None
        self.head_bias: torch.Tensor | None = None
        self.head_column: torch.Tensor | None = None
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

    def train_head_on(self, used: torch.Tensor | None) -> None:
        """Train the LM head on the rows of the `used` token ids only, plus one row that every other token
        shares; None: the whole head. A novel uses about a third of a 13k character vocabulary."""
        V = self.config.vocab_size
        if used is None or used.numel() == V:
            self.head_rows = self.head_bias = self.head_column = None
            return
        device = self.lm_head.weight.device
        used = used.to(device)
        unused = torch.ones(V, dtype=torch.bool, device=device)
        unused[used] = False
        self.head_rows = torch.cat([used, unused.nonzero()[0]])  # (U+1,) the first unused token's row is shared
        # log(count) on the shared logit: the probability the whole head gives all unused tokens together
        # once their rows equal the shared one (tie_unused_rows), so both heads define the same model
        self.head_bias = torch.zeros(len(self.head_rows), device=device)
        self.head_bias[-1] = math.log(unused.sum().item())
        column = torch.full((V + 1,), len(used), dtype=torch.long, device=device)  # unused -> the shared column
        column[used] = torch.arange(len(used), device=device)
        column[-1] = -1  # targets of -1 (ignored) index this last entry and stay -1
        self.head_column = column

    @torch.no_grad()
    def tie_unused_rows(self) -> None:
        """Copy the shared row into every unused token's row: the whole head (evaluation, sampling, export) then
        gives the distribution that training with train_head_on scored. Nothing to do without it."""
        if self.head_rows is not None:
            weight = self.lm_head.weight
            weight[self.head_column[:-1] == len(self.head_rows) - 1] = weight[self.head_rows[-1]].clone()

    @classmethod
    def from_state_dict(cls, model_args: dict, state: dict[str, torch.Tensor]) -> "GPT":
        """A model from a checkpoint's model_args and weights; the one place that knows checkpoint key quirks."""
        model = cls(GPTConfig(**model_args))
        # a model trained under torch.compile saves its weights with this prefix
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state.items()})
        return model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                pos: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_weight: float = 0.5) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> (logits, loss). With targets: logits (B, T, V), or (B, T, U+1) in training after
        train_head_on, and the mean cross-entropy (targets of -1 are ignored); without: only the last position's logits, (B, 1, V). pos (T,) are the tokens'
        positions, 0..T-1 unless given (generation with a cache gives them). memory (B, T): the count model's
        probability of each target; the loss is then that of the mixture (1 - memory_weight) * p_gpt +
        memory_weight * memory, so the network learns what the counts do not know."""
        T = idx.size(1)
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}; "
                                 f"crop it to the last {self.config.block_size} tokens")
            pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, pos, cache, layer)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        if self.training and self.head_rows is not None:
            # (B, T, U+1): a third of the head's work for a novel. Training targets are all in `used`.
            logits = F.linear(x, self.lm_head.weight[self.head_rows], self.head_bias)
            targets = self.head_column[targets]
        else:
            logits = self.lm_head(x)  # (B, T, V)
        if memory is None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        flat = targets.reshape(-1)
        log_p = -F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), flat, ignore_index=-1,
                                 reduction="none")  # (B*T,) ln p_gpt of each target
        mixed = torch.logaddexp(log_p + math.log(1 - memory_weight),
                                memory.reshape(-1).float().clamp_min(1e-30).log() + math.log(memory_weight))
        valid = flat >= 0
        return logits, -(mixed * valid).sum() / valid.sum().clamp_min(1)

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, peak_flops: float | None) -> float:
        """Model FLOPs utilization of one iteration of dt seconds against peak_flops (runtime.peak_flops_for
        gives a GPU's); nan when the peak is unknown."""
        if peak_flops is None:
            return float("nan")
        # PaLM appendix B: 6 FLOPs per parameter per token, plus attention's
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * self.get_num_params() + 12 * L * H * Q * T
        return flops_per_token * T * fwdbwd_per_iter / dt / peak_flops
