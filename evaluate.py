"""
How good is a model on a novel: n-gram baselines and a GPT's loss on a whole split, in nats per token.

    python evaluate.py --out_dir out-novel-cpu --baseline     # val split: model, KN trigram, modified-KN 5-gram
    python evaluate.py --init_from model/final_model --text chapter.txt --dataset mynovel

    kneser_ney_trigram_loss(train_ids, val_ids, vocab_size)       # the bar config/novel_cpu.py must beat
    modified_kneser_ney_loss(train_ids, val_ids, vocab_size, 5)   # the strongest count-based baseline
    whole_split_loss(model, val_ids, context=64)                  # a GPT on every token of val
    loss_report(nats)                                             # nats, bits and perplexity on one line

One token is one character with our vocabulary, so nats per token are nats per character.
"""

import math
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from checkpoint import check_vocab, load_model, resolve_source
from configurator import Options, UserError, exit_with_error, get_config
from dataset import open_dataset
from preparing import check_encoding, check_errors, describe_encodings, prepare_default_corpus, read_documents
from quant import apply_quantization, check_quantize_mode
from runtime import init_runtime, out_of_memory

MIN_DISCOUNT = 0.05  # modified Kneser-Ney discounts never go below this (only tiny corpora get near it)


# ------------------------------------------------------------------ n-gram models

class NgramIndex:
    """Every n-gram of orders 1..order in a token stream, each numbered, as sorted int64 keys.

    The key of a k-gram is (number of its first k-1 tokens as a (k-1)-gram) * V + its last token, so keys stay
    below (train length) * V whatever the order, where packing k raw tokens would overflow int64 from k = 5 on
    (13,317^5 > 2^63). The empty 0-gram is number 0, so a 1-gram's key is its token."""

    def __init__(self, train_ids: np.ndarray, vocab_size: int, order: int):
        self.vocab_size, self.order = vocab_size, order
        tokens = check_ids(train_ids, vocab_size, "train_ids")
        self.keys: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]  # keys[k]: the sorted k-gram keys
        self.first_seen: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]  # a position where each k-gram ends
        self.train_grams: list[np.ndarray] = [np.zeros(len(tokens), dtype=np.int64)]
        for k in range(1, order + 1):
            keys, valid = self._extension_keys(tokens, self.train_grams[k - 1], k)
            unique, first, inverse = np.unique(keys[valid], return_index=True, return_inverse=True)
            grams = np.full(len(tokens), -1, dtype=np.int64)  # (N,) the k-gram ending at each position
            grams[valid] = inverse
            self.keys.append(unique)
            self.first_seen.append(np.flatnonzero(valid)[first])
            self.train_grams.append(grams)

    def _extension_keys(self, tokens: np.ndarray, shorter: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys of the k-grams ending at each position, from the (k-1)-grams ending one position earlier."""
        context = np.zeros(len(tokens), dtype=np.int64) if k == 1 else np.concatenate(([-1], shorter[:-1]))
        valid = context >= 0  # the first k-1 positions, and k-grams whose prefix never occurred in training
        return np.where(valid, context * self.vocab_size + tokens, -1), valid

    def grams(self, ids: np.ndarray) -> list[np.ndarray]:
        """For each order k, the number of the k-gram of `ids` ending at each position; -1 where it is unseen."""
        tokens = check_ids(ids, self.vocab_size, "ids")
        found = [np.zeros(len(tokens), dtype=np.int64)]
        for k in range(1, self.order + 1):
            keys, valid = self._extension_keys(tokens, found[k - 1], k)
            found.append(self._find(k, keys, valid))
        return found

    def _find(self, k: int, keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
        if len(self.keys[k]) == 0:  # training shorter than k tokens
            return np.full(len(keys), -1, dtype=np.int64)
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


class InterpolatedKneserNey:
    """A stack of Kneser-Ney levels over a base distribution on the vocabulary; never a zero probability."""

    def __init__(self, index: NgramIndex, levels: list[KneserNeyLevel], base: np.ndarray):
        self.index, self.levels, self.base = index, levels, base  # base: (V,) sums to 1, no zeros
        self.vocab_size = index.vocab_size

    def token_probabilities(self, ids: np.ndarray) -> np.ndarray:
        """(N,) the probability of each token of `ids` given the up to order-1 tokens before it in `ids`."""
        grams = self.index.grams(ids)
        p = self.base[np.asarray(ids, dtype=np.int64)]
        for level in self.levels:
            k = level.order
            # the (k-1)-gram before each token; -1 for the first k-1 tokens, which have less context
            context = np.concatenate(([-1], grams[k - 1][:-1])) if k > 1 else np.zeros(len(p), dtype=np.int64)
            seen = context >= 0
            totals = np.where(seen, level.totals[np.maximum(context, 0)], 0.0)
            backoff = np.where(seen, level.backoff[np.maximum(context, 0)], 0.0)
            counts = np.where(grams[k] >= 0, level.counts[np.maximum(grams[k], 0)], 0)
            kept = counts - level.discounts[np.minimum(counts, 3)]
            with np.errstate(divide="ignore", invalid="ignore"):
                p = np.where(totals > 0, (kept + backoff * p) / totals, p)
        return p

    def probabilities(self, context: Sequence[int]) -> np.ndarray:
        """(V,) the distribution of the next token after `context` (its last order-1 tokens count)."""
        context = check_ids(np.asarray(context, dtype=np.int64), self.vocab_size, "context").tolist()
        p, V = self.base.copy(), self.vocab_size
        for level in self.levels:
            k = level.order
            if k - 1 > len(context):
                break
            h = self.index.number(context[len(context) - (k - 1):] if k > 1 else [])
            if h < 0:
                break  # an unseen context: no longer one was seen either
            if level.totals[h] == 0:
                continue
            lo, hi = np.searchsorted(level.keys, [h * V, (h + 1) * V])
            counts = level.counts[lo:hi]
            p = p * (level.backoff[h] / level.totals[h])
            p[level.keys[lo:hi] - h * V] += (counts - level.discounts[np.minimum(counts, 3)]) / level.totals[h]
        return p


def raw_counts(index: NgramIndex, k: int) -> np.ndarray:
    """(G,) how many times training holds each k-gram."""
    grams = index.train_grams[k]
    return np.bincount(grams[grams >= 0], minlength=len(index.keys[k]))


def modified_discounts(counts: np.ndarray) -> np.ndarray:
    """Chen & Goodman's D(1), D(2), D(3+) from the count-of-counts n1..n4, as (4,) with D(0) = 0 in front."""
    n = [np.count_nonzero(counts == i) for i in range(5)]  # n[i]: how many n-grams have count i
    y = n[1] / (n[1] + 2 * n[2]) if n[1] + 2 * n[2] else 0.5
    discounts = np.zeros(4)
    for i in (1, 2, 3):
        estimate = i - (i + 1) * y * n[i + 1] / n[i] if n[i] else y
        # D(i) <= i keeps every count's share non-negative; the floor keeps mass for the lower orders where
        # a tiny corpus breaks the estimate (on a novel the estimates lie well inside these bounds)
        discounts[i] = min(max(estimate, MIN_DISCOUNT), i)
    return discounts



def modified_kneser_ney(train_ids: np.ndarray, vocab_size: int, order: int = 5) -> InterpolatedKneserNey:
    """Interpolated modified Kneser-Ney (Chen & Goodman 1998): three discounts per order, continuation counts
    below the highest order, and a uniform distribution over the vocabulary under the unigrams."""
    if order < 1:
        raise ValueError(f"order must be at least 1, got {order}")
    index = NgramIndex(train_ids, vocab_size, order)
    levels = []
    for k in range(1, order + 1):
        counts = raw_counts(index, k) if k == order else continuation_counts(index, k)
        levels.append(kneser_ney_level(index, k, counts, modified_discounts(counts)))
    return InterpolatedKneserNey(index, levels, np.full(vocab_size, 1.0 / vocab_size))


def kneser_ney_trigram(train_ids: np.ndarray, vocab_size: int, discount: float = 0.85) -> InterpolatedKneserNey:
    """Interpolated Kneser-Ney character trigram with one discount, over add-1/2 smoothed continuation unigrams.

    The discount 0.85 is the best of 0.75-0.99 on the default corpus (4.450 nats; 0.75 gives 4.467)."""
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


def modified_kneser_ney_loss(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int, order: int = 5) -> float:
    """Val loss (nats per token) of interpolated modified Kneser-Ney on val_ids[1:], the tokens
    whole_split_loss scores, each given up to order-1 tokens of context."""
    p = modified_kneser_ney(train_ids, vocab_size, order).token_probabilities(val_ids)
    return mean_nats(p[1:])


def mean_nats(p: np.ndarray) -> float:
    """The mean of -ln p: a loss in nats per token."""
    if len(p) == 0:
        raise ValueError("the val split is too short to score a token; give a longer one")
    return float(-np.log(p).mean())


def check_ids(ids: np.ndarray, vocab_size: int, name: str) -> np.ndarray:
    """ids as a 1-D int64 array, or a ValueError saying what is wrong with them."""
    tokens = np.asarray(ids)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D array of token ids, got shape {tokens.shape} of {tokens.dtype}")
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{name} holds token ids outside 0..{vocab_size - 1} (min {tokens.min()}, max "
                         f"{tokens.max()}); was it prepared with another vocabulary?")
    return tokens.astype(np.int64)


# ------------------------------------------------------------------ a GPT on a whole split

def window_starts(n_tokens: int, block_size: int, context: int) -> list[int]:
    """Starts of the windows that score targets 1..n_tokens-1: stride block_size - context, so every window
    after the first re-reads `context` tokens and scores only the targets past them."""
    stride = block_size - context
    starts = [0]
    while starts[-1] + block_size < n_tokens - 1:  # the last window does not reach the last target yet
        starts.append(starts[-1] + stride)
    return starts


@torch.no_grad()
def whole_split_loss(model: torch.nn.Module, ids: np.ndarray, context: int = 64, batch_size: int = 16,
                     autocast: torch.dtype | AbstractContextManager | None = None) -> float:
    """Mean cross-entropy (nats) of a GPT on every token of ids but the first, each predicted from at least
    `context` tokens (fewer only at the very start); autocast: None (float32), a dtype, or a context."""
    config = model.config
    if not 0 <= context < config.block_size:
        raise ValueError(f"context must be in 0..{config.block_size - 1} (below block_size), got {context}")
    tokens = check_ids(ids, config.vocab_size, "ids")
    if len(tokens) < 2:
        raise ValueError(f"ids has {len(tokens)} tokens; scoring needs at least 2")
    device = next(model.parameters()).device
    starts = window_starts(len(tokens), config.block_size, context)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with autocast_context(autocast, device.type):
            for first in range(0, len(starts), batch_size):
                x, y = window_batch(tokens, starts[first:first + batch_size], config.block_size, context)
                x, y = x.to(device), y.to(device)
                _, loss = model(x, y)  # the mean over the scored targets (those not -1)
                scored = int((y >= 0).sum())
                total += loss.item() * scored
                count += scored
    finally:
        model.train(was_training)
    assert count == len(tokens) - 1, "the windows must score every token but the first exactly once"
    return total / count


def window_batch(tokens: np.ndarray, starts: list[int], block_size: int, context: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of the windows at `starts`, (B, T) each; targets already scored, or past the end
    of the split (the padding of a short last window), are -1."""
    x = torch.zeros(len(starts), block_size, dtype=torch.long)
    y = torch.full((len(starts), block_size), -1, dtype=torch.long)
    for row, start in enumerate(starts):
        window = torch.from_numpy(tokens[start:start + block_size + 1])
        n = len(window) - 1
        x[row, :n], y[row, :n] = window[:-1], window[1:]
        if start > 0:
            y[row, :context] = -1  # the previous window scored these
    return x, y


def autocast_context(autocast: torch.dtype | AbstractContextManager | None, device_type: str
                     ) -> AbstractContextManager:
    """A context for the forward passes: none for None or float32, torch.autocast for another dtype."""
    if autocast is None or autocast == torch.float32:
        return nullcontext()
    if isinstance(autocast, torch.dtype):
        return torch.autocast(device_type, dtype=autocast)
    return autocast


# ------------------------------------------------------------------ reporting

def loss_report(nats: float) -> str:
    """'4.450 nats, 6.420 bits, perplexity 85.6' for a loss in nats per token (= per character)."""
    return f"{nats:.3f} nats, {nats / math.log(2):.3f} bits, perplexity {math.exp(nats):.1f}"


# ------------------------------------------------------------------ command line

DEFAULTS = Options(
    out_dir=("out", "a run folder (its ckpt.pt), a .pt file, or a Hugging Face / GPT2-Chinese folder"),
    init_from=("", "the same as out_dir, for a .pt file or a model folder; wins over out_dir"),
    vocab=("", "vocab.txt for a model folder without one"),
    dataset=("", "dataset under data_dir to score; default: the checkpoint's own"),
    data_dir=("", "default: the checkpoint's own"),
    text=("", "a text file to score instead of the dataset's val split (UTF-8, UTF-16, GBK/GB18030, Big5: detected)"),
    encoding=("auto", "the --text file's encoding: auto (detected), or a Python codec name such as big5"),
    errors=("strict", "replace: score a --text file past bytes that do not decode (each becomes U+FFFD)"),
    context=(64, "every character is scored with at least this many characters of context (at most half a "
                 "short model's block_size when left at 64)"),
    baseline=(False, "also print the Kneser-Ney trigram and modified Kneser-Ney 5-gram of the dataset"),
    device=("auto", "auto, cpu, cuda, cuda:1, mps"),
    dtype=("float32", "the scoring precision; float32 is exact, bfloat16 faster where the CPU computes it natively"),
    quantize=("none", "int8: score the model with int8 weights, as sample.py --quantize=int8 decodes (CPU)"),
)


def evaluate(config: dict) -> dict[str, float]:
    """Print and return the model's loss on the val split (or --text) and, with --baseline, the n-grams'."""
    rt = init_runtime(config["device"], config["dtype"], compile=False)
    source = config["init_from"] or config["out_dir"]
    check_quantize_mode(config["quantize"], str(rt.device))  # before the slow part
    path = resolve_source(source)
    model, tok, metadata = load_model(path, config["vocab"], rt.device)
    model = apply_quantization(model, config["quantize"])
    trained_on = metadata.get("config", {})
    name = config["dataset"] or trained_on.get("dataset", "")
    data_dir = config["data_dir"] or trained_on.get("data_dir", "data")
    results = {}
    if name and (config["baseline"] or not config["text"]):
        prepare_default_corpus(data_dir, name)  # when it is the one asked for and missing
    if config["text"]:
        docs, _, encodings = read_documents(Path(config["text"]), config["encoding"], config["errors"])
        text = "\n".join(docs)  # one file's text (a folder's files, or a JSON file's documents, one after another)
        if encodings[0] != "utf-8" and config["encoding"] == "auto":
            print(f"read {config['text']} as {describe_encodings(encodings)} (detected; --encoding=NAME forces another)")
        ids, what = tok.encode(text), config["text"]
        if len(ids) < 2:
            raise UserError(f"--text {config['text']} holds {len(ids)} character(s); scoring needs at least 2")
    else:
        if not name:
            raise UserError(f"{path} does not say which dataset it was trained on; give --dataset (or --text)")
        data = open_dataset(data_dir, name)
        check_vocab(tok, path, data.tokenizer, str(data.folder), "score the dataset it was trained on")
        ids, what = np.asarray(data.tokens("val")), f"{data.folder} val split"
    context = config["context"]
    if context >= model.config.block_size:
        if context != DEFAULTS["context"]:
            raise UserError(f"--context {context} must be below the model's block_size, {model.config.block_size}")
        context = model.config.block_size // 2  # the default is for our users' 512: a short model gets half its own
        print(f"note: the model's block_size is {model.config.block_size}; scoring with --context={context}")
    print(f"{what}: {len(ids):,} characters, each scored with at least {context} of context")
    results["model"] = whole_split_loss(model, ids, context=context, autocast=rt.dtype)
    print(f"  model {source}: {loss_report(results['model'])}")
    if config["baseline"]:
        data = open_dataset(data_dir, name)
        train_ids = np.asarray(data.tokens("train"))
        results["trigram"] = kneser_ney_trigram_loss(train_ids, ids, tok.vocab_size)
        results["kn5"] = modified_kneser_ney_loss(train_ids, ids, tok.vocab_size, order=5)
        print(f"  Kneser-Ney trigram: {loss_report(results['trigram'])}")
        print(f"  modified Kneser-Ney 5-gram: {loss_report(results['kn5'])}")
    return results


def main(argv: list[str] | None = None) -> None:
    try:
        config = get_config(DEFAULTS, argv)
        if config["context"] < 0:
            raise UserError(f"--context must be 0 or more, got {config['context']}")
        check_encoding(config["encoding"])
        check_errors(config["errors"])
        evaluate(config)
    except UserError as e:
        exit_with_error(e)
    except ValueError as e:
        exit_with_error(str(e).splitlines()[0])
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130)
    except (RuntimeError, MemoryError) as e:
        short = out_of_memory(e)
        if short is None:
            raise
        exit_with_error(f"{short} while scoring: use --dtype=bfloat16 or --quantize=int8 (CPU), or a machine with "
                        "more memory")


if __name__ == "__main__":
    main()
