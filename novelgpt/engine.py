"""Generation: continue token ids (or a text prompt) with a GPT, one token at a time, through a KVCache.

    engine = Engine(model)                      # engine.compile() for a compiled one-token step
    for row, piece in engine.stream_text(tok, "宝玉笑道", SamplingSettings(max_new_tokens=200)):
        print(piece, end="")

Sampling (repetition penalty, top-k, top-p, temperature) runs on the model's device; the host sees
one (B,) tensor of new tokens per step, which streaming needs anyway.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, Iterator, Sequence

import torch
from torch.nn import functional as F

from novelgpt.mixture import Memory
from model import GPT, KVCache
from novelgpt.tokenizer import Tokenizer


MAX_SAMPLES = 4096  # samples generated together as one batch, at most


def option(default: object, explanation: str, low: float | None = None, rule: str = "", above: bool = False,
           high: float | None = None, request_high: float | None = None, least: float | None = None) -> object:
    """A SamplingSettings field: its default, its --help line, and its bounds: at least low (above low when
    `above`), at most high and, other than 0, at least `least`, said as "must be <rule>"; request_high is the
    most a request to serve.py may ask where the command line allows more."""
    return field(default=default, metadata=dict(explanation=explanation, low=low, above=above, high=high,
                                                rule=rule, request_high=request_high, least=least))


@dataclass
class SamplingSettings:
    """Every sampling option: the one definition that sample.py, serve.py (its request body too) and the
    GPT2-Chinese flags take their defaults, explanations and bounds from."""
    # the bounds of temperature, top_p and repetition_penalty keep float32 logits finite: a temperature of 1e-300
    # (or 1e300) turns them into inf and NaN
    max_new_tokens: int = option(500, "tokens (characters) per sample", low=1, rule="at least 1")
    temperature: float = option(1.0, "0 means always the most likely token; else in 0.001..1000", low=0,
                                least=1e-3, high=1e3, rule="0 (the likeliest token) or in 0.001..1000", request_high=5)
    top_k: int = option(8, "keep the k most likely tokens; 0 = off; 8 is GPT2-Chinese's default", low=0,
                        rule="0 (off) or more")
    top_p: float = option(1.0, "nucleus sampling, in (0, 1]; 1 = off", low=0, above=True, least=1e-6, high=1,
                          rule="in (0, 1] (1 = off)")
    repetition_penalty: float = option(1.0, "> 1 makes tokens already in the text less likely; in 0.01..100",
                                       low=0, above=True, least=1e-2, high=1e2, rule="in 0.01..100 (1 = off)",
                                       request_high=10)
    num_samples: int = option(1, "generated together as one batch", low=1, high=MAX_SAMPLES,
                              rule=f"in 1..{MAX_SAMPLES} (one batch)")
    seed: int | None = option(None, "None: not seeded", low=0, rule="0 or more", request_high=2**63 - 1)
    ignore_eos: bool = option(False, "keep going past a generated end-of-text token")

    def check(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        for f in fields(self):
            value, low, high, least = (getattr(self, f.name), f.metadata["low"], f.metadata["high"],
                                       f.metadata["least"])
            if value is None or low is None:
                continue
            tiny = least is not None and 0 < value < least
            if value < low or (f.metadata["above"] and value == low) or (high is not None and value > high) or tiny:
                note = f" (at least {least:g})" if tiny and f"{least:g}" not in f.metadata["rule"] else ""
                raise ValueError(f"{f.name} must be {f.metadata['rule']}, got {value}{note}")

    @classmethod
    def options(cls, **defaults: object) -> dict[str, tuple[object, str]]:
        """The options for a script's configurator.Options, with the script's own defaults where given; the
        seed is each script's own (sample.py draws one, serve.py one per request)."""
        return {f.name: (defaults.get(f.name, f.default), f.metadata["explanation"]) for f in fields(cls)
                if f.name != "seed"}

    @classmethod
    def from_config(cls, config: dict, seed: int | None = None) -> "SamplingSettings":
        """The settings among a script's options (the keys options() gave it)."""
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name != "seed"}, seed=seed)


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
    if top_k is not None and top_k < logits.size(-1):
        # the k best first, then everything on (B, k): sampling then never touches the whole vocabulary
        best, ids = torch.topk(logits, top_k)  # (B, k), sorted best first
        return ids.gather(1, sample_sorted(best, top_p, generator)).squeeze(1)
    if top_p is not None:
        best, ids = torch.sort(logits, descending=True)
        return ids.gather(1, sample_sorted(best, top_p, generator)).squeeze(1)
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator).squeeze(1)


def sample_sorted(best: torch.Tensor, top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """A column index (B, 1) drawn from logits `best` (B, n) sorted best first, nucleus-cut at top_p when set."""
    if top_p is not None:
        # keep the smallest set of best tokens whose probability reaches top_p (always at least one)
        probs = F.softmax(best, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # never the best token, as top_p > 0
        best = best.masked_fill(drop, float("-inf"))
    return torch.multinomial(F.softmax(best, dim=-1), num_samples=1, generator=generator)


class Engine:
    """A model ready to generate: its KV cache (kept between calls of one batch size) and its one-token step."""

    def __init__(self, model: GPT, memory: Memory | None = None):
        self.model = model.eval()
        self.memory = memory  # mixed into every step's distribution (mixture.py); None: the GPT alone
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
               stop_ids: Sequence[int] = (), generator: torch.Generator | None = None,
               copies: int = 1) -> Iterator[torch.Tensor]:
        """Yield a (B * copies,) LongTensor per step: each row's new token, -1 once the row has produced a stop id.
        Rows k * copies to k * copies + copies - 1 continue idx's row k; its prompt is read once for all of them.

        Ends when every row has stopped or after max_new_tokens. Past block_size the window slides: the
        last block_size // 2 tokens are kept and the cache rebuilt from them in one pass."""
        V, block_size = self.model.config.vocab_size, self.model.config.block_size
        if idx.size(1) == 0:
            raise ValueError("the prompt must have at least one token")
        if temperature < 0 or repetition_penalty <= 0 or (top_k is not None and top_k < 1) \
                or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError("sampling needs temperature >= 0, repetition_penalty > 0, top_k >= 1, 0 < top_p <= 1")
        if idx.min() < 0 or idx.max() >= V:  # once per prompt, not per step: it costs a host sync
            raise ValueError(f"token ids must be in [0, {V}); was the text encoded with this model's vocabulary?")
        if max_new_tokens <= 0:
            return
        device, B = idx.device, idx.size(0) * copies
        self._cache_for(B, device)
        window = idx[:, -block_size:]
        logits = self._prefill(window, copies)
        window, idx = window.repeat_interleave(copies, dim=0), idx.repeat_interleave(copies, dim=0)
        seen = torch.zeros(B, V, dtype=torch.bool, device=device).scatter_(1, idx, True)
        banned = torch.tensor(list(banned_ids), dtype=torch.long, device=device)
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        histories = idx.tolist() if self.memory is not None else None  # the memory looks them up on the host
        for step in range(max_new_tokens):
            if histories is not None:  # sampling settings then apply to the mixed distribution
                logits = self.memory.mix(logits, histories)
            token = sample_next(logits, seen, temperature, top_k, top_p, repetition_penalty, banned, generator)
            yield torch.where(finished, -1, token)
            finished |= torch.isin(token, stops)
            if step == max_new_tokens - 1 or (stops.numel() and finished.all()):
                return
            seen.scatter_(1, token[:, None], True)
            if histories is not None:
                for history, new in zip(histories, token.tolist()):
                    history.append(new)
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

    def _prefill(self, window: torch.Tensor, copies: int) -> torch.Tensor:
        """One pass over the prompts window (b, T) into the cache, each row's keys and values copied to its
        `copies` rows (nanochat's way: the work of one prompt, not of every sample); their logits (b * copies, V)."""
        T, positions = window.size(1), torch.arange(window.size(1), device=window.device)
        if copies == 1:
            self.cache.limit = T  # eager passes read only the filled slots
            return self._forward(window, positions)
        full = self.cache
        self.cache = KVCache(self.model.config, window.size(0), window.device, full.k.dtype)
        try:
            self.cache.limit = T
            logits = self._forward(window, positions)
            full.k[:, :, :, :T] = self.cache.k[:, :, :, :T].repeat_interleave(copies, dim=1)
            full.v[:, :, :, :T] = self.cache.v[:, :, :, :T].repeat_interleave(copies, dim=1)
        finally:
            self.cache = full
        full.limit = T
        return logits.repeat_interleave(copies, dim=0)

    def stream_settings(self, tok: Tokenizer, prompt_ids: Sequence[int], settings: SamplingSettings, rows: int,
                        stop_ids: Sequence[int]) -> Iterator[torch.Tensor]:
        """stream for `rows` continuations of one prompt as settings say (seeded when settings.seed is set);
        [UNK] and [PAD] are never generated."""
        device = self.model.lm_head.weight.device
        generator = torch.Generator(device=device)
        if settings.seed is not None:
            generator.manual_seed(settings.seed)
        return self.stream(torch.as_tensor(prompt_ids, device=device).unsqueeze(0), settings.max_new_tokens,
                           temperature=settings.temperature, top_k=settings.top_k or None,
                           top_p=settings.top_p if settings.top_p < 1 else None,
                           repetition_penalty=settings.repetition_penalty, banned_ids=sorted({tok.unk_id, tok.pad_id}),
                           stop_ids=stop_ids, generator=generator, copies=rows)

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
        stop_ids = [] if settings.ignore_eos else [tok.eos_id]
        for step in self.stream_settings(tok, prompt_ids, settings, settings.num_samples, stop_ids):
            for row, token in enumerate(step.tolist()):  # one transfer per step
                if token >= 0 and token not in stop_ids:  # the end-of-text marker is not part of the sample
                    yield row, tok.decode([token])


def stream_text(model: GPT, tok: Tokenizer, prompt: str, settings: SamplingSettings) -> Iterator[tuple[int, str]]:
    """Engine(model).stream_text(...), for a single use; keep an Engine to reuse its cache and compiled step."""
    return Engine(model).stream_text(tok, prompt, settings)
