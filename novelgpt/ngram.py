"""The novel's own memory: a count model of the training text (interpolated modified Kneser-Ney over characters).

    counts = load_ngram(data, order=5)                  # built once per dataset, cached in data/<name>/
    p = counts.token_probabilities(val_ids)             # (N,) each token given the order-1 tokens before it
    p = counts.leave_one_out                            # (N_train,) each training token, its own count removed
    dist = counts.next_distributions(contexts, device)  # (B, V) torch, the next token after B histories

A network trained for minutes has not yet learned a novel's names and set phrases; a table of counts knows
them after one pass. mixture.py mixes the two per character.
"""
from __future__ import annotations

import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

MIN_DISCOUNT = 0.05  # modified Kneser-Ney discounts never go below this (only tiny corpora get near it)
CACHE_VERSION = 1  # bump when the cached arrays change meaning
DEFAULT_ORDER = 5  # a trigram mixes 0.02 nats worse, a 7-gram no better (whole 红楼梦 val split)


def check_ids(ids: np.ndarray, vocab_size: int, name: str) -> np.ndarray:
    """ids as a 1-D int64 array, or a ValueError saying what is wrong with them."""
    tokens = np.asarray(ids)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D array of token ids, got shape {tokens.shape} of {tokens.dtype}")
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{name} holds token ids outside 0..{vocab_size - 1} (min {tokens.min()}, max "
                         f"{tokens.max()}); was it prepared with another vocabulary?")
    return tokens.astype(np.int64)


def _number(keys: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Number the distinct valid keys in sorted order: (sorted unique keys, each position's number or -1,
    one position holding each key). torch's sort: about twice numpy's mergesort on two cores."""
    where = np.flatnonzero(valid)
    if len(where) == 0:
        return np.zeros(0, np.int64), np.full(len(keys), -1, np.int32), np.zeros(0, np.int64)
    ordered, perm = torch.sort(torch.from_numpy(keys[where]))
    ordered, perm = ordered.numpy(), perm.numpy()
    starts = np.concatenate(([True], ordered[1:] != ordered[:-1]))  # (M,) the first of each run of one key
    numbers = np.empty(len(where), dtype=np.int32)
    numbers[perm] = np.cumsum(starts, dtype=np.int64) - 1
    grams = np.full(len(keys), -1, dtype=np.int32)
    grams[where] = numbers
    return ordered[starts], grams, where[perm[starts]]


class NgramIndex:
    """Every n-gram of orders 1..order in a token stream, each numbered, as sorted int64 keys.

    The key of a k-gram is (number of its first k-1 tokens as a (k-1)-gram) * V + its last token, so keys stay
    below (train length) * V whatever the order, where packing k raw tokens would overflow int64 from k = 5 on
    (13,317^5 > 2^63). The empty 0-gram is number 0, so a 1-gram's key is its token. The numbers of a
    context's continuations form one contiguous run of keys, [h * V, (h + 1) * V)."""

    def __init__(self, train_ids: np.ndarray, vocab_size: int, order: int):
        self.vocab_size, self.order = vocab_size, order
        tokens = check_ids(train_ids, vocab_size, "train_ids")
        self.keys: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]  # keys[k]: the sorted k-gram keys
        self.first_seen: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]  # a position where each k-gram ends
        self.train_grams: list[np.ndarray] = [np.zeros(len(tokens), dtype=np.int32)]  # (N,) per order, -1: none
        for k in range(1, order + 1):
            keys, valid = self._extension_keys(tokens, self.train_grams[k - 1], k)
            unique, grams, seen = _number(keys, valid)
            self.keys.append(unique)
            self.first_seen.append(seen)
            self.train_grams.append(grams)

    def _extension_keys(self, tokens: np.ndarray, shorter: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys of the k-grams ending at each position, from the (k-1)-grams ending one position earlier."""
        if k == 1:
            context = np.zeros(len(tokens), dtype=np.int64)
        else:
            context = np.empty(len(tokens), dtype=np.int64)
            context[0], context[1:] = -1, shorter[:-1]
        valid = (context >= 0) & (tokens >= 0)  # not the first k-1 positions, nor an unseen prefix or padding
        return np.where(valid, context * self.vocab_size + tokens, -1), valid

    def grams(self, ids: np.ndarray) -> list[np.ndarray]:
        """For each order k, the number of the k-gram of `ids` ending at each position; -1 where it is unseen.
        ids may be (N,) or (B, W); a -1 token is padding that no gram contains."""
        tokens = np.asarray(ids, dtype=np.int64)
        shape = tokens.shape
        tokens = tokens.reshape(-1, shape[-1]) if tokens.ndim > 1 else tokens[None]
        found = [np.zeros(tokens.shape, dtype=np.int64)]
        for k in range(1, self.order + 1):
            context = np.full(tokens.shape, -1, dtype=np.int64)
            context[:, 1:] = found[k - 1][:, :-1]
            if k == 1:
                context[:] = 0
            valid = (context >= 0) & (tokens >= 0)
            keys = np.where(valid, context * self.vocab_size + tokens, -1)
            found.append(self._find(k, keys, valid))
        return [f.reshape(shape) for f in found]

    def _find(self, k: int, keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
        if len(self.keys[k]) == 0:  # training shorter than k tokens
            return np.full(keys.shape, -1, dtype=np.int64)
        where = np.minimum(np.searchsorted(self.keys[k], keys), len(self.keys[k]) - 1)
        return np.where(valid & (self.keys[k][where] == keys), where, -1)

    def number(self, gram: Sequence[int]) -> int:
        """The number of one n-gram (0 for the empty one), or -1 when training never saw it."""
        number = 0
        for k, token in enumerate(gram, start=1):
            number = int(self._find(k, np.array([number * self.vocab_size + int(token)]), np.array([True]))[0])
            if number < 0:
                break
        return number


@dataclass
class KneserNeyLevel:
    """One order k of an interpolated Kneser-Ney model:
    p_k(w | h) = (c(h w) - D(c(h w)) + backoff(h) * p_{k-1}(w | h')) / total(h), or p_{k-1} where total(h) is 0."""
    order: int
    keys: np.ndarray  # (G,) the k-gram keys, sorted: context number * V + word
    counts: np.ndarray  # (G,) raw counts at the highest order, continuation counts below it
    totals: np.ndarray  # (H,) per (k-1)-gram context: the sum of its k-grams' counts
    backoff: np.ndarray  # (H,) per context: the mass the discounts took, sum of D(c) over its k-grams
    discounts: np.ndarray  # (4,) D(0) = 0, D(1), D(2), D(3+)


def kneser_ney_level(index: NgramIndex, k: int, counts: np.ndarray, discounts: np.ndarray) -> KneserNeyLevel:
    """Order k's context totals and backoff masses from its k-grams' counts."""
    contexts = index.keys[k] // index.vocab_size  # (G,) the (k-1)-gram number of each k-gram
    taken = discounts[np.minimum(counts, 3)]
    n_contexts = len(index.keys[k - 1])
    return KneserNeyLevel(order=k, keys=index.keys[k], counts=counts,
                          totals=np.bincount(contexts, weights=counts, minlength=n_contexts),
                          backoff=np.bincount(contexts, weights=taken, minlength=n_contexts),
                          discounts=discounts)


def continuation_counts(index: NgramIndex, k: int) -> np.ndarray:
    """(G,) for each k-gram, how many distinct tokens precede it in training: the (k+1)-gram types it ends."""
    suffixes = index.train_grams[k][index.first_seen[k + 1]]  # the k-gram ending each (k+1)-gram type
    return np.bincount(suffixes, minlength=len(index.keys[k]))


def raw_counts(index: NgramIndex, k: int) -> np.ndarray:
    """(G,) how many times training holds each k-gram."""
    grams = index.train_grams[k]
    return np.bincount(grams[grams >= 0], minlength=len(index.keys[k]))


class InterpolatedKneserNey:
    """A stack of Kneser-Ney levels over a base distribution on the vocabulary; never a zero probability."""

    def __init__(self, index: NgramIndex, levels: list[KneserNeyLevel], base: np.ndarray):
        self.index, self.levels, self.base = index, levels, base  # base: (V,) sums to 1, no zeros
        self.vocab_size, self.order = index.vocab_size, levels[-1].order
        self.leave_one_out: np.ndarray | None = None  # (N_train,) set by modified_kneser_ney
        # the levels without a context (order 1) give the same distribution everywhere: computed once
        dense = base.astype(np.float64)
        for level in levels:
            if level.order == 1:
                dense = _apply_level(level, dense, 0, level.counts)
        self.dense = dense  # (V,) float64
        self._dense_on: dict[str, torch.Tensor] = {}

    def token_probabilities(self, ids: np.ndarray) -> np.ndarray:
        """(N,) the probability of each token of `ids` given the up to order-1 tokens before it in `ids`."""
        tokens = check_ids(ids, self.vocab_size, "ids")
        grams = self.index.grams(tokens)
        p = self.base[tokens]
        for level in self.levels:
            context, counts = _level_lookup(level, grams, len(p))
            p = _interpolate(level, p, context, counts)
        return p

    def next_distributions(self, contexts: Sequence[Sequence[int]] | np.ndarray, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, V) `dtype` on `device`: the next-token distribution after each of B histories (their last
        order-1 tokens count; rows may differ in length). Built on the device from the constant part and the
        few counts the histories have, so a GPU never moves a whole distribution across."""
        B, W = len(contexts), self.order - 1
        window = np.full((B, max(W, 1)), -1, dtype=np.int64)
        for row, history in enumerate(contexts):
            tail = np.asarray(history, dtype=np.int64)[-W:] if W else np.zeros(0, np.int64)
            if len(tail):
                window[row, -len(tail):] = tail
        grams = self.index.grams(window)  # per order, (B, W): the k-gram ending at each slot
        scale = np.ones(B)  # (B,) what the distribution so far is multiplied by at the levels above
        rows, cols, values = [], [], []
        for level in self.levels:
            if level.order == 1:
                continue  # inside self.dense
            k = level.order
            c = grams[k - 1][:, -1] if k - 1 <= W else np.full(B, -1)  # (B,) the context's number
            active = c >= 0
            total = np.where(active, level.totals[np.maximum(c, 0)], 0.0)
            active &= total > 0
            safe = np.where(active, total, 1.0)
            a = np.where(active, level.backoff[np.maximum(c, 0)] / safe, 1.0)
            scale = scale * a
            for r in range(len(rows)):  # the sparse parts below are scaled by this level's backoff too
                values[r] = values[r] * a[rows[r]]
            lo = np.searchsorted(level.keys, np.maximum(c, 0) * self.vocab_size)
            hi = np.searchsorted(level.keys, (np.maximum(c, 0) + 1) * self.vocab_size)
            lengths = np.where(active, hi - lo, 0)
            n = int(lengths.sum())
            if n == 0:
                continue
            row = np.repeat(np.arange(B), lengths)
            first = np.repeat(np.cumsum(lengths) - lengths, lengths)
            at = np.arange(n) - first + np.repeat(lo, lengths)
            counts = level.counts[at]
            rows.append(row)
            cols.append(level.keys[at] - c[row] * self.vocab_size)
            values.append((counts - level.discounts[np.minimum(counts, 3)]) / safe[row])
        key = f"{device}:{dtype}"
        if key not in self._dense_on:
            self._dense_on[key] = torch.as_tensor(self.dense, dtype=dtype, device=device)
        out = self._dense_on[key][None, :] * torch.as_tensor(scale, dtype=dtype, device=device)[:, None]
        if rows:
            row, col, value = np.concatenate(rows), np.concatenate(cols), np.concatenate(values)
            out.index_put_((torch.as_tensor(row, device=device), torch.as_tensor(col, device=device)),
                           torch.as_tensor(value, dtype=dtype, device=device), accumulate=True)
        return out

    def probabilities(self, context: Sequence[int]) -> np.ndarray:
        """(V,) the distribution of the next token after `context` (its last order-1 tokens count)."""
        context = check_ids(np.asarray(context, dtype=np.int64), self.vocab_size, "context")
        return self.next_distributions([context], dtype=torch.float64).numpy()[0]


def _level_lookup(level: KneserNeyLevel, grams: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """For each position: the number of the (k-1)-gram before it (-1: none) and the count of its k-gram."""
    k = level.order
    if k > 1:
        context = np.empty(n, dtype=np.int64)
        context[0], context[1:] = -1, grams[k - 1][:-1]
    else:
        context = np.zeros(n, dtype=np.int64)
    counts = np.where(grams[k] >= 0, level.counts[np.maximum(grams[k], 0)], 0)
    return context, counts


def _apply_level(level: KneserNeyLevel, p: np.ndarray, context: int, counts: np.ndarray) -> np.ndarray:
    """A context-free level (order 1) on a whole distribution p (V,), given every word's count."""
    total, backoff = level.totals[context], level.backoff[context]
    if total == 0:
        return p
    dense_counts = np.zeros(len(p))
    dense_counts[level.keys % len(p)] = counts
    return (dense_counts - level.discounts[np.minimum(dense_counts.astype(np.int64), 3)] + backoff * p) / total


def _interpolate(level: KneserNeyLevel, p: np.ndarray, context: np.ndarray, counts: np.ndarray,
                 totals: np.ndarray | None = None, backoff: np.ndarray | None = None) -> np.ndarray:
    """One level over per-position probabilities p (N,): p_k = (c - D(c) + backoff * p_{k-1}) / total."""
    seen = context >= 0
    if totals is None:
        totals = np.where(seen, level.totals[np.maximum(context, 0)], 0.0)
        backoff = np.where(seen, level.backoff[np.maximum(context, 0)], 0.0)
    kept = counts - level.discounts[np.minimum(counts, 3)]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(totals > 0, (kept + backoff * p) / totals, p)


def modified_discounts(counts: np.ndarray) -> np.ndarray:
    """Chen & Goodman's D(1), D(2), D(3+) from the count-of-counts n1..n4, as (4,) with D(0) = 0 in front."""
    n = np.bincount(np.minimum(counts, 5).astype(np.int64), minlength=6)  # n[i]: how many n-grams have count i
    y = n[1] / (n[1] + 2 * n[2]) if n[1] + 2 * n[2] else 0.5
    discounts = np.zeros(4)
    for i in (1, 2, 3):
        estimate = i - (i + 1) * y * n[i + 1] / n[i] if n[i] else y
        # D(i) <= i keeps every count's share non-negative; the floor keeps mass for the lower orders where
        # a tiny corpus breaks the estimate (on a novel the estimates lie well inside these bounds)
        discounts[i] = min(max(estimate, MIN_DISCOUNT), i)
    return discounts


def modified_kneser_ney(train_ids: np.ndarray, vocab_size: int, order: int = DEFAULT_ORDER) -> InterpolatedKneserNey:
    """Interpolated modified Kneser-Ney (Chen & Goodman 1998): three discounts per order, continuation counts
    below the highest order, and a uniform distribution over the vocabulary under the unigrams."""
    if order < 1:
        raise ValueError(f"order must be at least 1, got {order}")
    index = NgramIndex(train_ids, vocab_size, order)
    levels = []
    raw = {k: raw_counts(index, k) for k in range(min(2, order), order + 1)}  # the LOO needs orders 2+
    for k in range(1, order + 1):
        counts = raw[k] if k == order else continuation_counts(index, k)
        levels.append(kneser_ney_level(index, k, counts, modified_discounts(counts)))
    model = InterpolatedKneserNey(index, levels, np.full(vocab_size, 1.0 / vocab_size))
    model.leave_one_out = _leave_one_out(model, raw).astype(np.float32)
    index.train_grams = []  # only the build needs them: 4 bytes per token per order
    index.first_seen = []
    return model


def _leave_one_out(model: InterpolatedKneserNey, raw: dict[int, np.ndarray]) -> np.ndarray:
    """(N,) each training token's probability with its own occurrence taken out of the counts.

    At the highest order its count, its context's total and the discount mass lose that occurrence. A lower
    order holds continuation counts (distinct left neighbours), which lose one only where the occurrence was
    the only one of the longer gram. The discounts stay (a one-count change in millions)."""
    index, n = model.index, len(model.index.train_grams[0])
    grams = index.train_grams
    tokens = index.keys[1][np.maximum(grams[1], 0)] % model.vocab_size
    p = model.base[tokens]
    for level in model.levels:
        k = level.order
        context, counts = _level_lookup(level, grams, n)
        if k == model.order:
            removed = grams[k] >= 0
        else:
            longer = grams[k + 1]
            removed = (longer >= 0) & (raw[k + 1][np.maximum(longer, 0)] == 1)
        removed &= context >= 0
        seen = context >= 0
        totals = np.where(seen, level.totals[np.maximum(context, 0)], 0.0)
        backoff = np.where(seen, level.backoff[np.maximum(context, 0)], 0.0)
        after = np.where(removed, counts - 1, counts)
        d = level.discounts
        backoff = backoff - np.where(removed, d[np.minimum(counts, 3)] - d[np.minimum(after, 3)], 0.0)
        totals = totals - removed
        p = _interpolate(level, p, context, after, totals, backoff)
    return p


def kneser_ney_trigram(train_ids: np.ndarray, vocab_size: int, discount: float = 0.85) -> InterpolatedKneserNey:
    """Interpolated Kneser-Ney character trigram with one discount, over add-1/2 smoothed continuation unigrams.

    The discount 0.85 is the best of 0.75-0.99 on the default corpus."""
    if not 0 < discount <= 1:
        raise ValueError(f"discount must be in (0, 1], got {discount}")
    index = NgramIndex(train_ids, vocab_size, 3)
    discounts = np.array([0.0, discount, discount, discount])
    levels = [kneser_ney_level(index, 2, continuation_counts(index, 2), discounts),
              kneser_ney_level(index, 3, raw_counts(index, 3), discounts)]
    left_neighbours = np.bincount(index.keys[2] % vocab_size, minlength=vocab_size)  # distinct b before each c
    base = (left_neighbours + 0.5) / (len(index.keys[2]) + 0.5 * vocab_size)
    return InterpolatedKneserNey(index, levels, base)


def kneser_ney_trigram_loss(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int,
                            discount: float = 0.85) -> float:
    """Val loss (nats per token) of the interpolated Kneser-Ney trigram, on val_ids[2:] (a full context each)."""
    p = kneser_ney_trigram(train_ids, vocab_size, discount).token_probabilities(val_ids)
    return mean_nats(p[2:])


def modified_kneser_ney_loss(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int,
                             order: int = DEFAULT_ORDER) -> float:
    """Val loss (nats per token) of interpolated modified Kneser-Ney on val_ids[1:], the tokens
    whole_split_loss scores, each given up to order-1 tokens of context."""
    p = modified_kneser_ney(train_ids, vocab_size, order).token_probabilities(val_ids)
    return mean_nats(p[1:])


def mean_nats(p: np.ndarray) -> float:
    """The mean of -ln p: a loss in nats per token."""
    if len(p) == 0:
        raise ValueError("the val split is too short to score a token; give a longer one")
    return float(-np.log(p).mean())


# ------------------------------------------------------------------ the cache beside a dataset

CACHE_PREFIX = "cache-ngram"  # data/<name>/cache-* is reserved for files derived from the dataset


def cache_path(folder: Path, order: int) -> Path:
    return folder / f"{CACHE_PREFIX}-o{order}.npz"


def _save(model: InterpolatedKneserNey, path: Path, fingerprint: str) -> None:
    arrays = {"stamp": np.array([CACHE_VERSION, model.order, model.vocab_size], dtype=np.int64),
              "fingerprint": np.frombuffer(fingerprint.encode("ascii"), dtype=np.uint8),
              "base": model.base, "leave_one_out": model.leave_one_out}
    for k, keys in enumerate(model.index.keys):
        arrays[f"keys{k}"] = keys
    for level in model.levels:
        for field in ("counts", "totals", "backoff", "discounts"):
            arrays[f"{field}{level.order}"] = getattr(level, field)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as e:  # a read-only dataset still gets its n-gram, only without the cache
        print(f"note: cannot cache the n-gram in {path.parent} ({e.strerror}); it is built at each start",
              file=sys.stderr)
    finally:
        tmp.unlink(missing_ok=True)


def _load(path: Path, order: int, vocab_size: int, fingerprint: str) -> InterpolatedKneserNey | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            if not np.array_equal(f["stamp"], [CACHE_VERSION, order, vocab_size]) \
                    or f["fingerprint"].tobytes().decode("ascii") != fingerprint:
                return None
            index = NgramIndex.__new__(NgramIndex)
            index.vocab_size, index.order = vocab_size, order
            index.keys = [f[f"keys{k}"] for k in range(order + 1)]
            index.train_grams, index.first_seen = [], []
            levels = [KneserNeyLevel(k, index.keys[k], f[f"counts{k}"], f[f"totals{k}"], f[f"backoff{k}"],
                                     f[f"discounts{k}"]) for k in range(1, order + 1)]
            model = InterpolatedKneserNey(index, levels, f["base"])
            model.leave_one_out = f["leave_one_out"]
            return model
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # none yet, or damaged: build again
        return None


def load_ngram(folder: str | Path, train_ids: np.ndarray, vocab_size: int, fingerprint: str,
               order: int = DEFAULT_ORDER) -> InterpolatedKneserNey:
    """The modified-KN model of a dataset's train split: read from data/<name>/cache-ngram-o<order>.npz when it
    was built from this preparation (the fingerprint), else built and cached (written atomically)."""
    path = cache_path(Path(folder), order)
    model = _load(path, order, vocab_size, fingerprint)
    if model is None:
        model = modified_kneser_ney(np.asarray(train_ids), vocab_size, order)
        _save(model, path, fingerprint)
    return model
