"""Generation: continue token ids (or a text prompt) with a GPT, one token at a time, through a KVCache.

    engine = Engine(model)                      # engine.compile() for a compiled one-token step
    for row, piece in engine.stream_text(tok, "宝玉笑道", SamplingSettings(max_new_tokens=200)):
        print(piece, end="")

Sampling (repetition penalty, top-k, top-p, temperature) runs on the model's device; the host sees
one (B,) tensor of new tokens per step, which streaming needs anyway.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch.nn import functional as F

from model import GPT, KVCache
from tokenizer import Tokenizer


MAX_SAMPLES = 4096  # samples generated together as one batch, at most


@dataclass
class SamplingSettings:
    max_new_tokens: int = 500  # tokens (characters) per sample
    temperature: float = 1.0  # 0: always the most likely token
    top_k: int = 8  # 0 = off; 8 is GPT2-Chinese's default
    top_p: float = 1.0  # nucleus sampling in (0, 1]; 1 = off
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the text less likely
    num_samples: int = 1  # generated together as one batch
    seed: int | None = None  # None: not seeded
    ignore_eos: bool = False  # keep going past a generated end-of-text token

    def check(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        # the bounds keep float32 logits finite: a temperature of 1e-300 (or 1e300) turns them into inf and NaN
        for ok, message in ((1 <= self.num_samples <= MAX_SAMPLES,
                             f"num_samples must be in 1..{MAX_SAMPLES} (one batch), got {self.num_samples}"),
                            (self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
                            (self.temperature == 0 or 1e-3 <= self.temperature <= 1e3,
                             f"temperature must be 0 (the likeliest token) or in 0.001..1000, got {self.temperature}"),
                            (self.top_k >= 0, f"top_k must be 0 (off) or more, got {self.top_k}"),
                            (1e-6 <= self.top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {self.top_p}"
                             + (" (at least 1e-6)" if 0 < self.top_p < 1e-6 else "")),
                            (1e-2 <= self.repetition_penalty <= 1e2,
                             f"repetition_penalty must be in 0.01..100 (1 = off), got {self.repetition_penalty}")):
            if not ok:
                raise ValueError(message)


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


class Engine:
    """A model ready to generate: its KV cache (kept between calls of one batch size) and its one-token step."""

    def __init__(self, model: GPT):
        self.model = model.eval()
        self.cache: KVCache | None = None
        self.compiled = False
        self._step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def compile(self) -> None:
        """Compile the one-token step: CUDA graphs on a GPU; on a CPU the weights are frozen into the graph,
        prepacked for oneDNN. The first generation compiles (seconds to a minute), each batch size again."""
        self.compiled = True
        self._step = None

    def _forward(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """idx (B, T) at positions pos (T,) through the cache -> the last position's logits (B, V) in fp32."""
        logits, _ = self.model(idx, cache=self.cache, pos=pos)
        return logits[:, -1, :].float()

    def _cache_for(self, batch_size: int, device: torch.device) -> None:
        dtype = self.model.lm_head.weight.dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):  # an int8 head: cache in activations' dtype
            dtype = self.model.transformer.wte.weight.dtype
        if self.cache is None or self.cache.batch_size != batch_size or self.cache.k.device != device \
                or self.cache.k.dtype != dtype:
            self.cache = KVCache(self.model.config, batch_size, device, dtype)
            self._step = None
        if self._step is None:
            self._step = self._forward
            if self.compiled:
                # one graph for every position: shapes are fixed and the position is a tensor argument
                options = {"mode": "reduce-overhead"} if device.type == "cuda" else {"options": {"freezing": True}}
                self._step = torch.compile(self._forward, dynamic=False, **options)

    @torch.no_grad()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, repetition_penalty: float = 1.0, banned_ids: Sequence[int] = (),
               stop_ids: Sequence[int] = (), generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield a (B,) LongTensor per step: each row's new token, -1 once the row has produced a stop id.

        Ends when every row has stopped or after max_new_tokens. Past block_size the window slides: the
        last block_size // 2 tokens are kept and the cache rebuilt from them in one pass."""
        B, V, block_size = idx.size(0), self.model.config.vocab_size, self.model.config.block_size
        if idx.size(1) == 0:
            raise ValueError("the prompt must have at least one token")
        if temperature < 0 or repetition_penalty <= 0 or (top_k is not None and top_k < 1) \
                or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError("sampling needs temperature >= 0, repetition_penalty > 0, top_k >= 1, 0 < top_p <= 1")
        if idx.min() < 0 or idx.max() >= V:  # once per prompt, not per step: it costs a host sync
            raise ValueError(f"token ids must be in [0, {V}); was the text encoded with this model's vocabulary?")
        if max_new_tokens <= 0:
            return
        device = idx.device
        self._cache_for(B, device)
        window = idx[:, -block_size:]
        seen = torch.zeros(B, V, dtype=torch.bool, device=device).scatter_(1, idx, True)
        banned = torch.tensor(list(banned_ids), dtype=torch.long, device=device)
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.cache.limit = window.size(1)  # eager passes read only the filled slots
        logits = self._forward(window, torch.arange(window.size(1), device=device))  # prefill: one pass
        for step in range(max_new_tokens):
            token = sample_next(logits, seen, temperature, top_k, top_p, repetition_penalty, banned, generator)
            yield torch.where(finished, -1, token)
            finished |= torch.isin(token, stops)
            if step == max_new_tokens - 1 or (stops.numel() and finished.all()):
                return
            seen.scatter_(1, token[:, None], True)
            n_cached = window.size(1)
            window = torch.cat([window, token[:, None]], dim=1)
            if n_cached == block_size:  # no free slot: keep the recent half and rebuild the cache
                window = window[:, -max(1, block_size // 2):]
                self.cache.limit = window.size(1)
                logits = self._forward(window, torch.arange(window.size(1), device=device))
            else:
                # the compiled graph reads every slot (masked), so it serves every position unchanged
                self.cache.limit = None if self.compiled else n_cached + 1
                logits = self._step(token[:, None], torch.tensor([n_cached], device=device))

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """Like stream, but returns the prompt followed by the new tokens, (B, T + steps)."""
        steps = list(self.stream(idx, max_new_tokens, **sampling))
        return torch.cat([idx, torch.stack(steps, dim=1)], dim=1) if steps else idx

    def stream_text(self, tok: Tokenizer, prompt: str, settings: SamplingSettings) -> Iterator[tuple[int, str]]:
        """Continue prompt num_samples times as one batch; yield (sample index, text piece) as tokens come.

        The prompt itself is not yielded. An end-of-text token ends its sample unless ignore_eos; [UNK] and
        [PAD] are never generated. Closing the iterator stops the generation."""
        settings.check()
        prompt_ids = tok.encode(prompt)
        if len(prompt_ids) == 0:
            raise ValueError('empty prompt; give some text, or "[CLS]" to begin a new text')
        device = self.model.lm_head.weight.device
        idx = torch.as_tensor(prompt_ids, device=device).unsqueeze(0).repeat(settings.num_samples, 1)
        generator = torch.Generator(device=device)
        if settings.seed is not None:
            generator.manual_seed(settings.seed)
        stop_ids = [] if settings.ignore_eos else [tok.eos_id]
        steps = self.stream(idx, settings.max_new_tokens, temperature=settings.temperature,
                            top_k=settings.top_k or None, top_p=settings.top_p if settings.top_p < 1 else None,
                            repetition_penalty=settings.repetition_penalty,
                            banned_ids=sorted({tok.unk_id, tok.pad_id}), stop_ids=stop_ids, generator=generator)
        for step in steps:
            for row, token in enumerate(step.tolist()):  # one transfer per step
                if token >= 0 and token not in stop_ids:  # the end-of-text marker is not part of the sample
                    yield row, tok.decode([token])


def stream_text(model: GPT, tok: Tokenizer, prompt: str, settings: SamplingSettings) -> Iterator[tuple[int, str]]:
    """Engine(model).stream_text(...), for a single use; keep an Engine to reuse its cache and compiled step."""
    return Engine(model).stream_text(tok, prompt, settings)
