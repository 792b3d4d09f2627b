"""The GPT and the novel's memory, mixed per character: p = w_gpt * p_gpt + w_ngram * p_ngram + w_cache * p_cache.

    p_gpt = token_probabilities(model, val_ids)            # (N-1,) the GPT on every target, >= 64 of context
    parts = memory_parts(counts, val_ids)                  # (3, N-1) the n-gram and the recent-text caches
    weights = fit_weights(np.stack([p_gpt, *parts]))       # maximum likelihood (EM), summing to 1
    memory = Memory(counts, weights, cache_size)           # what the engine mixes into every decode step

p_cache is how often the token occurs in the last `cache_size` characters: a novel repeats the names of the
scene at hand. p_pair_cache is how often the last character was followed by the token in the recent text: the
scene's own phrases. The weights are fitted on the val split: text the counts have not seen, as at sampling time.
"""
from __future__ import annotations

from contextlib import AbstractContextManager

import numpy as np
import torch

from novelgpt.ngram import InterpolatedKneserNey
from novelgpt.scoring import token_log_probs

DEFAULT_CACHE_SIZE = 200  # characters of recent text in the cache part (200 beat 100, 500, 1000 and 2000)
DEFAULT_PAIR_CACHE_SIZE = 2000  # characters of recent text in the pair cache
EM_STEPS = 200  # the weights move by < 1e-6 long before this on a novel's val split
PARTS = ("gpt", "ngram", "cache", "pair_cache")


# ------------------------------------------------------------------ the memory's parts on a split

def recent_counts(keys: np.ndarray, size: int) -> np.ndarray:
    """(N,) how many of the up to `size` positions before each one hold the same key."""
    keys = np.asarray(keys, dtype=np.int64)
    n = len(keys)
    order = np.lexsort((np.arange(n), keys))  # positions grouped by key, ascending within a key
    grouped, pos = keys[order], order
    group_start = np.searchsorted(grouped, grouped, side="left")
    rank = np.arange(n) - group_start  # how many earlier positions hold the same key
    # the earlier ones inside the window: positions >= pos - size, found within the key's own group
    span = n + size + 1
    keyed = (grouped - grouped.min()) * span + pos
    window_start = np.searchsorted(keyed, keyed - size, side="left")
    out = np.empty(n, dtype=np.int64)
    out[pos] = rank - (window_start - group_start)
    return out


def cache_probabilities(ids: np.ndarray, size: int = DEFAULT_CACHE_SIZE) -> np.ndarray:
    """(N,) for each token, its share of the up to `size` tokens before it (0 for the first token)."""
    tokens = np.asarray(ids, dtype=np.int64)
    return recent_counts(tokens, size) / np.maximum(np.minimum(np.arange(len(tokens)), size), 1)


def pair_cache_probabilities(ids: np.ndarray, size: int = DEFAULT_PAIR_CACHE_SIZE) -> np.ndarray:
    """(N,) for each token, how often the token before it was followed by it within the last `size` tokens:
    count(prev, token) / count(prev) over pairs that lie wholly in the window (0 where prev did not occur)."""
    tokens = np.asarray(ids, dtype=np.int64)
    out = np.zeros(len(tokens))
    if len(tokens) < 2:
        return out
    V = int(tokens.max()) + 1
    pairs = recent_counts(tokens[:-1] * V + tokens[1:], size - 1)  # (N-1,) the pair ending at i+1, seen before
    contexts = recent_counts(tokens, size - 1)[:-1]  # (N-1,) the token at i seen before, with a successor
    with np.errstate(divide="ignore", invalid="ignore"):
        out[1:] = np.where(contexts > 0, pairs / np.maximum(contexts, 1), 0.0)
    return out


def memory_parts(counts: InterpolatedKneserNey, ids: np.ndarray, cache_size: int = DEFAULT_CACHE_SIZE,
                 pair_cache_size: int = DEFAULT_PAIR_CACHE_SIZE) -> np.ndarray:
    """(3, N-1): p_ngram, p_cache and p_pair_cache of every token of ids but the first, the targets
    token_log_probs scores."""
    return aligned_parts(counts, ids, cache_size, pair_cache_size)[:, 1:].astype(np.float64)


# ------------------------------------------------------------------ the weights

def fit_weights(parts: np.ndarray, steps: int = EM_STEPS) -> np.ndarray:
    """(K,) mixture weights that maximise the mean ln(sum_k w_k p_k) over parts (K, N), by EM from uniform."""
    K = parts.shape[0]
    weights = np.full(K, 1.0 / K)
    for _ in range(steps):
        mixed = weights @ parts  # (N,)
        new = weights * (parts / np.maximum(mixed, 1e-300)).mean(axis=1)
        new /= new.sum()
        if np.abs(new - weights).max() < 1e-7:
            return new
        weights = new
    return weights


def mixture_loss(parts: np.ndarray, weights: np.ndarray) -> float:
    """Mean nats per token of the mixture with `weights` over parts (K, N)."""
    return float(-np.log(np.maximum(weights @ parts, 1e-300)).mean())


def two_fold_loss(parts: np.ndarray) -> float:
    """Weights fitted on one half and scored on the other, both ways, the two losses averaged by tokens."""
    half = parts.shape[1] // 2
    first, second = parts[:, :half], parts[:, half:]
    total = mixture_loss(second, fit_weights(first)) * second.shape[1] \
        + mixture_loss(first, fit_weights(second)) * first.shape[1]
    return total / parts.shape[1]


# ------------------------------------------------------------------ the mixture a checkpoint carries

def aligned_parts(counts: InterpolatedKneserNey, ids: np.ndarray, cache_size: int = DEFAULT_CACHE_SIZE,
                  pair_cache_size: int = DEFAULT_PAIR_CACHE_SIZE) -> np.ndarray:
    """(3, N): p_ngram, p_cache and p_pair_cache of each token of ids, indexed like ids (for training batches)."""
    return np.stack([counts.token_probabilities(ids), cache_probabilities(ids, cache_size),
                     pair_cache_probabilities(ids, pair_cache_size)])


def mixture_record(weights: np.ndarray, order: int, cache_size: int, fingerprint: str, losses: dict) -> dict:
    """What ckpt.pt keeps under "mixture": plain numbers and strings (weights_only loading reads them)."""
    return {"weights": {name: float(w) for name, w in zip(PARTS, weights)}, "order": int(order),
            "cache_size": int(cache_size), "pair_cache_size": DEFAULT_PAIR_CACHE_SIZE, "dataset_fingerprint": fingerprint,
            "val": {name: float(v) for name, v in losses.items()}}


def fit_mixture(model: torch.nn.Module, counts: InterpolatedKneserNey, val_ids: np.ndarray, fingerprint: str,
                cache_size: int = DEFAULT_CACHE_SIZE, context: int = 64,
                autocast: torch.dtype | AbstractContextManager | None = None) -> dict:
    """Score the whole val split with the GPT and the memory, fit the weights, and return mixture_record's dict
    with the losses: model, ngram, mixture (fitted) and two_fold, in nats per character."""
    p_gpt = np.exp(token_log_probs(model, val_ids, context=min(context, model.config.block_size - 1),
                                   autocast=autocast))
    parts = np.concatenate([p_gpt[None], memory_parts(counts, val_ids, cache_size)])
    weights = fit_weights(parts)
    losses = {"model": mean_nats_of(parts[0]), "ngram": mean_nats_of(parts[1]),
              "mixture": mixture_loss(parts, weights), "two_fold": two_fold_loss(parts)}
    return mixture_record(weights, counts.order, cache_size, fingerprint, losses)


def mean_nats_of(p: np.ndarray) -> float:
    return float(-np.log(np.maximum(p, 1e-300)).mean())


# ------------------------------------------------------------------ at generation time

class Memory:
    """The mixture as the engine applies it to every decode step: the GPT's distribution, the n-gram's after each
    row's history, the share of each token in the row's last cache_size tokens, and what followed the row's last
    token in its last pair_cache_size tokens."""

    def __init__(self, counts: InterpolatedKneserNey, weights: np.ndarray, cache_size: int = DEFAULT_CACHE_SIZE,
                 pair_cache_size: int = DEFAULT_PAIR_CACHE_SIZE):
        self.counts, self.cache_size, self.pair_cache_size = counts, cache_size, pair_cache_size
        self.weights = [float(w) for w in weights] + [0.0] * (len(PARTS) - len(weights))  # as PARTS; sum to 1

    def mix(self, logits: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
        """(B, V) GPT logits and each row's tokens so far -> (B, V) log-probabilities of the mixture."""
        w_gpt, w_ngram, w_cache, w_pair = self.weights
        mixed = torch.softmax(logits.float(), dim=-1) * w_gpt
        order = self.counts.order
        contexts = [h[len(h) - order + 1:] if order > 1 else [] for h in histories]
        mixed += self.counts.next_distributions(contexts, logits.device) * w_ngram
        if w_cache > 0:
            recent = [h[-self.cache_size:] for h in histories]
            width = max(map(len, recent))
            tokens = torch.tensor([r + [0] * (width - len(r)) for r in recent], device=logits.device)  # (B, W)
            present = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in recent],
                                   device=logits.device)
            shares = torch.zeros_like(mixed).scatter_add_(1, tokens, present / present.sum(1, keepdim=True))
            mixed += shares * w_cache
        if w_pair > 0:
            recent = [h[-self.pair_cache_size:] for h in histories]
            width = max(map(len, recent))
            tokens = torch.tensor([[-1] * (width - len(r)) + r for r in recent], device=logits.device)  # (B, W)
            follows = (tokens[:, :-1] == tokens[:, -1:]) & (tokens[:, :-1] >= 0)  # (B, W-1) earlier last tokens
            counts = torch.zeros_like(mixed).scatter_add_(1, tokens[:, 1:].clamp(min=0), follows.float())
            mixed += counts / follows.sum(1, keepdim=True).clamp(min=1) * w_pair  # rows never seen add nothing
        return mixed.clamp_min(1e-30).log()
