"""The n-gram baselines are proper probability models that agree with direct implementations of their
formulas, and whole_split_loss scores every token once with the context it promises."""
import json
import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from novelgpt import ngram
from evaluate import loss_report
from novelgpt.scoring import whole_split_loss
from novelgpt.ngram import kneser_ney_trigram, kneser_ney_trigram_loss, modified_kneser_ney, modified_kneser_ney_loss
from model import GPT, GPTConfig
from novelgpt.preparing import prepare


def skewed_ids(rng: np.random.Generator, vocab: int, n: int) -> np.ndarray:
    """Tokens with a Zipf-like skew and a little Markov structure, so n-grams repeat at many counts."""
    weights = 1.0 / np.arange(1, vocab + 1) ** 1.2
    ids = rng.choice(vocab, size=n, p=weights / weights.sum())
    copy = rng.random(n) < 0.3
    ids[1:][copy[1:]] = (ids[:-1][copy[1:]] + 1) % vocab  # often "the next token after the last one"
    return ids


# ------------------------------------------------------------------ direct implementations of the formulas

class DirectModifiedKneserNey:
    """Modified Kneser-Ney written straight from Chen & Goodman with tuples and dicts, for small data."""

    def __init__(self, train: list[int], vocab: int, order: int):
        self.vocab, self.order = vocab, order
        self.counts, self.discounts = {}, {}
        grams = {k: Counter(tuple(train[i - k + 1:i + 1]) for i in range(k - 1, len(train)))
                 for k in range(1, order + 1)}
        for k in range(1, order + 1):
            if k == order:
                self.counts[k] = dict(grams[k])
            else:  # continuation count: distinct tokens seen before the k-gram
                self.counts[k] = dict(Counter(g[1:] for g in grams[k + 1]))
            n = Counter(self.counts[k].values())
            y = n[1] / (n[1] + 2 * n[2]) if n[1] + 2 * n[2] else 0.5  # tiny data: Ney's estimate, or 1/2
            estimates = {i: i - (i + 1) * y * n[i + 1] / n[i] if n[i] else y for i in (1, 2, 3)}
            self.discounts[k] = {i: min(max(d, ngram.MIN_DISCOUNT), i) for i, d in estimates.items()}
        self.followers = {k: defaultdict(list) for k in self.counts}
        for k, counts in self.counts.items():
            for gram, c in counts.items():
                self.followers[k][gram[:-1]].append(c)

    def prob(self, word: int, context: tuple) -> float:
        context = context[max(0, len(context) - (self.order - 1)):] if self.order > 1 else ()
        lower = self.prob(word, context[1:]) if context else 1.0 / self.vocab
        k = len(context) + 1
        follower_counts = self.followers[k].get(context, [])
        total = sum(follower_counts)
        if total == 0:
            return lower
        d = self.discounts[k]
        gamma = sum(d[min(c, 3)] for c in follower_counts) / total
        c = self.counts[k].get(context + (word,), 0)
        return (c - d[min(c, 3)] if c else 0.0) / total + gamma * lower


def direct_trigram_probability(train: list[int], vocab: int, discount: float):
    """bench.py's original interpolated Kneser-Ney trigram, one probability at a time with dicts."""
    trigrams = Counter(zip(train, train[1:], train[2:]))
    context_counts, followers = Counter(), Counter()
    for (a, b, c), n in trigrams.items():
        context_counts[a, b] += n
        followers[a, b] += 1
    bigram_cont = Counter((b, c) for a, b, c in trigrams)  # distinct a before (b, c)
    middle_cont, middle_followers = Counter(), Counter()
    for (b, c), n in bigram_cont.items():
        middle_cont[b] += n
        middle_followers[b] += 1
    bigram_types = set(zip(train, train[1:]))
    unigram_cont = Counter(c for b, c in bigram_types)

    def prob(a: int, b: int, c: int) -> float:
        p = (unigram_cont[c] + 0.5) / (len(bigram_types) + 0.5 * vocab)
        if middle_cont[b]:
            p = (max(bigram_cont[b, c] - discount, 0) + discount * middle_followers[b] * p) / middle_cont[b]
        if context_counts[a, b]:
            p = (max(trigrams[a, b, c] - discount, 0) + discount * followers[a, b] * p) / context_counts[a, b]
        return p
    return prob


# ------------------------------------------------------------------ n-gram models

@pytest.mark.parametrize("order", [1, 3, 5])
def test_modified_kneser_ney_matches_the_direct_formulas(order):
    rng = np.random.default_rng(order)
    vocab = 9
    train, val = skewed_ids(rng, vocab - 1, 4000), skewed_ids(rng, vocab, 300)  # val has a token train lacks
    model, direct = modified_kneser_ney(train, vocab, order), DirectModifiedKneserNey(train.tolist(), vocab, order)
    for k, level in enumerate(model.levels, start=1):
        assert level.discounts[1:] == pytest.approx([direct.discounts[k][i] for i in (1, 2, 3)], rel=1e-12)
    val_list = val.tolist()
    expected = [direct.prob(val_list[i], tuple(val_list[max(0, i - order + 1):i])) for i in range(len(val))]
    assert model.token_probabilities(val) == pytest.approx(expected, rel=1e-9)
    expected_loss = -np.mean(np.log(expected[1:]))
    assert modified_kneser_ney_loss(train, val, vocab, order) == pytest.approx(expected_loss, rel=1e-12)
    for i in (0, 1, 7, 150, 299):
        context = val_list[max(0, i - order + 1):i]
        assert model.probabilities(context)[val_list[i]] == pytest.approx(expected[i], rel=1e-9)


def contexts_to_try(train: np.ndarray, vocab: int, length: int) -> list[list[int]]:
    """Seen contexts, unseen ones, ones with a token training never saw, and shorter ones."""
    seen = [train[i:i + length].tolist() for i in (0, 100, 2000, len(train) - length)]
    unseen = [[vocab - 1] * length, [0, vocab - 1] + [1] * (length - 2), list(range(length))]
    return seen + unseen + [[], train[:1].tolist(), [vocab - 1]]


@pytest.mark.parametrize("order", [3, 5])
def test_modified_kneser_ney_probabilities_sum_to_one_and_are_never_zero(order):
    rng = np.random.default_rng(0)
    vocab = 30
    train = skewed_ids(rng, vocab - 2, 5000)  # the last two tokens never occur in training
    model = modified_kneser_ney(train, vocab, order)
    for context in contexts_to_try(train, vocab, order - 1):
        p = model.probabilities(context)
        assert p.shape == (vocab,)
        assert abs(p.sum() - 1.0) < 1e-9
        assert p.min() > 0


def test_trigram_matches_the_original_and_sums_to_one():
    rng = np.random.default_rng(1)
    vocab = 12
    train, val = (rng.integers(0, vocab, 3000) ** 2) % vocab, rng.integers(0, vocab, 400)
    model, direct = kneser_ney_trigram(train, vocab, 0.85), direct_trigram_probability(train.tolist(), vocab, 0.85)
    expected = [direct(*val[i - 2:i + 1].tolist()) for i in range(2, len(val))]
    assert model.token_probabilities(val)[2:] == pytest.approx(expected, rel=1e-9)
    assert kneser_ney_trigram_loss(train, val, vocab) == pytest.approx(-np.mean(np.log(expected)), rel=1e-12)
    for context in contexts_to_try(train, vocab, 2):
        p = model.probabilities(context)
        assert abs(p.sum() - 1.0) < 1e-9 and p.min() > 0
        if len(context) == 2:
            assert p == pytest.approx([direct(*context, c) for c in range(vocab)], rel=1e-9)


def test_ngram_models_learn_a_repeating_pattern():
    pattern = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    train_ids, val_ids = np.tile(pattern, 200), np.tile(pattern, 10)
    assert kneser_ney_trigram_loss(train_ids, val_ids, 10) < 0.1 < math.log(10)
    assert modified_kneser_ney_loss(train_ids, val_ids, 10, order=5) < 0.1


def test_higher_orders_help_on_a_prepared_novel(tmp_path):
    rng = np.random.default_rng(0)
    phrases = ["宝玉笑道：", "黛玉听了，", "“你这会子又来了。”", "袭人忙说道：", "凤姐儿", "老太太", "。\n"]
    text = "".join(rng.choice(phrases, size=4000, p=[0.2, 0.15, 0.15, 0.1, 0.15, 0.1, 0.15]))
    (tmp_path / "novel.txt").write_text(text, encoding="utf-8")
    prepare(str(tmp_path / "novel.txt"), "novel", data_dir=str(tmp_path), block_size=64)
    folder = tmp_path / "novel"
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    train_ids = np.fromfile(folder / "train.bin", dtype=meta["dtype"])
    val_ids = np.fromfile(folder / "val.bin", dtype=meta["dtype"])
    losses = [modified_kneser_ney_loss(train_ids, val_ids, meta["vocab_size"], order) for order in (1, 2, 3, 5)]
    assert losses == sorted(losses, reverse=True)
    assert losses[-1] < 0.5 * losses[0]
    assert kneser_ney_trigram_loss(train_ids, val_ids, meta["vocab_size"]) < 0.6 * losses[0]


def test_ngram_losses_reject_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="outside 0..9"):
        modified_kneser_ney_loss(np.arange(10), np.array([1, 2, 10]), 10)
    with pytest.raises(ValueError, match="1-D"):
        kneser_ney_trigram_loss(np.arange(10).reshape(2, 5), np.arange(5), 10)
    with pytest.raises(ValueError, match="context holds token ids outside"):
        modified_kneser_ney(np.arange(10), 10, 3).probabilities([3, 12])


# ------------------------------------------------------------------ a GPT on a whole split

def tiny_gpt(block_size: int = 16, vocab: int = 50) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16))


@torch.no_grad()
def brute_force_loss(model: GPT, ids: np.ndarray, context: int) -> float:
    """One forward per token, each over exactly the context its window gives it, checked to be promised."""
    block, stride = model.config.block_size, model.config.block_size - context
    losses = []
    for t in range(1, len(ids)):
        start = 0 if t <= block else math.ceil((t - block) / stride) * stride
        assert min(t, context) <= t - start <= block
        logits, _ = model(torch.from_numpy(ids[start:t].astype(np.int64))[None])  # (1, 1, V)
        losses.append(-torch.log_softmax(logits[0, -1], dim=-1)[int(ids[t])].item())
    return float(np.mean(losses))


@pytest.mark.parametrize("n_tokens, context, batch_size", [(100, 5, 4), (100, 0, 1), (61, 15, 16), (9, 4, 2)])
def test_whole_split_loss_matches_one_forward_per_token(n_tokens, context, batch_size, one_thread):
    model = tiny_gpt()
    ids = np.random.default_rng(n_tokens).integers(0, 50, n_tokens).astype(np.uint16)
    model.train()
    loss = whole_split_loss(model, ids, context=context, batch_size=batch_size)
    assert model.training  # left as it was found
    model.eval()
    assert loss == pytest.approx(brute_force_loss(model, ids, context), abs=1e-5)


def test_whole_split_loss_takes_an_autocast_dtype_or_context(one_thread):
    model = tiny_gpt()
    ids = np.random.default_rng(0).integers(0, 50, 80)
    full = whole_split_loss(model, ids, context=4)
    by_dtype = whole_split_loss(model, ids, context=4, autocast=torch.bfloat16)
    by_context = whole_split_loss(model, ids, context=4, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    assert by_dtype == by_context != full
    assert by_dtype == pytest.approx(full, abs=0.05)


def test_whole_split_loss_rejects_bad_arguments(one_thread):
    model = tiny_gpt()
    with pytest.raises(ValueError, match="below the model.s block_size"):
        whole_split_loss(model, np.arange(40), context=16)
    with pytest.raises(ValueError, match="outside 0..49"):
        whole_split_loss(model, np.arange(60), context=4)
    with pytest.raises(ValueError, match="at least 2"):
        whole_split_loss(model, np.array([3]), context=4)


def test_loss_report_gives_nats_bits_and_perplexity():
    assert loss_report(math.log(100)) == "4.605 nats, 6.644 bits, perplexity 100.0"
