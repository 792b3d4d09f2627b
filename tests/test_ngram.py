"""The count model's new parts agree with direct computations: batched next-token distributions, leave-one-out
probabilities, the gram numbering, the cache beside a dataset; and mixture.py's cache part, EM weights and
per-token GPT scoring."""
import errno
import io
import math
import os
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from novelgpt import mixture
from novelgpt import ngram
from novelgpt.mixture import cache_probabilities, fit_weights, mixture_loss, two_fold_loss
from novelgpt.scoring import token_log_probs, whole_split_loss
from novelgpt.ngram import NgramIndex, load_ngram, mean_nats, modified_kneser_ney
from test_evaluate import DirectModifiedKneserNey, skewed_ids, tiny_gpt


# ------------------------------------------------------------------ next_distributions

def histories_to_try(train: np.ndarray, vocab: int, order: int) -> list[list[int]]:
    """Empty, short, exactly order-1, longer than order-1, ending where training ends, with unseen tokens."""
    unseen = vocab - 1  # skewed_ids(rng, vocab - 1, n) never draws it
    w = order - 1
    return [[], [int(train[0])], [unseen], train[10:10 + w].tolist(), train[200:200 + w + 4].tolist(),
            train[len(train) - w:].tolist() if w else [], train[-1:].tolist(), [unseen] * (w + 2),
            [unseen] + train[50:50 + w].tolist(), train[70:70 + w].tolist() + [unseen], [0, unseen, 1, 2, 3],
            train[:1].tolist() * (w + 3), list(range(vocab))]


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_next_distributions_match_probabilities_and_the_direct_formula(order):
    rng = np.random.default_rng(10 + order)
    vocab = 9
    train = skewed_ids(rng, vocab - 1, 3000)
    model, direct = modified_kneser_ney(train, vocab, order), DirectModifiedKneserNey(train.tolist(), vocab, order)
    histories = histories_to_try(train, vocab, order)
    p64 = model.next_distributions(histories, "cpu", torch.float64)
    assert p64.dtype == torch.float64 and p64.shape == (len(histories), vocab)
    p64 = p64.numpy()
    for row, history in enumerate(histories):
        expected = [direct.prob(word, tuple(history)) for word in range(vocab)]
        np.testing.assert_allclose(p64[row], expected, rtol=1e-9, atol=0, err_msg=f"history {history}")
        np.testing.assert_allclose(p64[row], model.probabilities(history), rtol=1e-12, atol=0)
        assert abs(p64[row].sum() - 1.0) < 1e-9
        assert p64[row].min() > 0
    p32 = model.next_distributions(histories)  # the defaults: cpu, float32
    assert p32.dtype == torch.float32 and p32.device.type == "cpu"
    np.testing.assert_allclose(p32.numpy(), p64, rtol=0, atol=1e-6)
    same_length = [h for h in histories if len(h) == order - 1]
    assert len(same_length) >= 2
    np.testing.assert_array_equal(model.next_distributions(np.array(same_length, dtype=np.int64), "cpu",
                                                           torch.float64).numpy(),
                                  model.next_distributions(same_length, "cpu", torch.float64).numpy())


# ------------------------------------------------------------------ leave-one-out

def all_grams(train: list[int], order: int) -> dict[int, Counter]:
    return {k: Counter(tuple(train[j - k + 1:j + 1]) for j in range(k - 1, len(train))) for k in range(1, order + 1)}


def direct_leave_one_out(train: list[int], vocab: int, order: int, i: int, grams: dict[int, Counter],
                         full: DirectModifiedKneserNey) -> float:
    """p(train[i] | its context) from the counts with every gram ending at i taken out once, the continuation
    counts recounted from the grams left, and the full data's discounts."""
    left = {k: Counter(c) for k, c in grams.items()}
    for k in range(1, order + 1):
        if i >= k - 1:
            gram = tuple(train[i - k + 1:i + 1])
            left[k][gram] -= 1
            if left[k][gram] == 0:
                del left[k][gram]
    loo = object.__new__(DirectModifiedKneserNey)  # its prob(), over these counts
    loo.vocab, loo.order, loo.discounts = vocab, order, full.discounts
    loo.counts = {k: dict(left[k]) if k == order else dict(Counter(g[1:] for g in left[k + 1]))
                  for k in range(1, order + 1)}
    loo.followers = {k: defaultdict(list) for k in loo.counts}
    for k, counts in loo.counts.items():
        for gram, c in counts.items():
            loo.followers[k][gram[:-1]].append(c)
    return loo.prob(train[i], tuple(train[max(0, i - order + 1):i]))


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_leave_one_out_matches_a_direct_recount(order):
    rng = np.random.default_rng(20 + order)
    vocab = 6
    train = skewed_ids(rng, vocab, 400)
    model = modified_kneser_ney(train, vocab, order)
    assert model.leave_one_out.shape == (len(train),)
    train_list = train.tolist()
    full = DirectModifiedKneserNey(train_list, vocab, order)
    grams = all_grams(train_list, order)
    expected = [direct_leave_one_out(train_list, vocab, order, i, grams, full) for i in range(len(train))]
    np.testing.assert_allclose(model.leave_one_out, expected, rtol=1e-6, atol=0)


def test_leave_one_out_loss_is_well_above_the_in_sample_loss_on_random_text():
    rng = np.random.default_rng(3)
    vocab = 20
    train, val = rng.integers(0, vocab, 20000), rng.integers(0, vocab, 5000)
    model = modified_kneser_ney(train, vocab, 5)
    in_sample = mean_nats(model.token_probabilities(train)[1:])
    held_out = mean_nats(model.leave_one_out[1:])
    val_loss = mean_nats(model.token_probabilities(val)[1:])
    assert held_out > in_sample + 0.5
    assert abs(held_out - val_loss) < 0.02 * val_loss  # it stands in for text the counts have not seen
    assert held_out < math.log(vocab) + 0.2


# ------------------------------------------------------------------ the gram numbering

def test_ngram_index_numbers_every_gram_once_in_sorted_order():
    rng = np.random.default_rng(4)
    vocab, order = 8, 4
    train = skewed_ids(rng, vocab - 1, 500)
    index = NgramIndex(train, vocab, order)
    train_list = train.tolist()
    for k, grams in all_grams(train_list, order).items():
        keys = index.keys[k]
        assert keys.dtype == np.int64 and len(keys) == len(grams)
        assert np.all(np.diff(keys) > 0)  # sorted and unique
        for gram in grams:
            number = index.number(gram)
            assert 0 <= number < len(keys)
            assert keys[number] == index.number(gram[:-1]) * vocab + gram[-1]
    assert index.number(()) == 0
    assert index.number((vocab - 1,)) == -1 and index.number((train_list[0], vocab - 1)) == -1
    absent = next(g for g in ((a, b, c) for a in range(vocab - 1) for b in range(vocab - 1)
                              for c in range(vocab - 1)) if g not in all_grams(train_list, 3)[3])
    assert index.number(absent) == -1


def test_ngram_index_grams_of_a_padded_batch_equal_those_of_each_row():
    rng = np.random.default_rng(5)
    vocab, order = 8, 4
    train = skewed_ids(rng, vocab - 1, 500)
    index = NgramIndex(train, vocab, order)
    ids = skewed_ids(rng, vocab, 60)  # holds the unseen token too
    found = index.grams(ids)
    for k in range(1, order + 1):
        expected = [index.number(ids[j - k + 1:j + 1].tolist()) if j >= k - 1 else -1 for j in range(len(ids))]
        assert found[k].tolist() == expected
        assert (found[k] >= 0).any()
    W = 9
    rows = [np.r_[[-1] * 4, train[30:35]], np.r_[train[100:103], [-1], train[103:108]], np.full(W, -1),
            train[200:209], np.r_[train[300:306], [-1] * 3], ids[10:19]]
    batch = np.stack(rows)
    assert batch.shape == (len(rows), W)
    batched = index.grams(batch)
    for k in range(1, order + 1):
        assert batched[k].shape == batch.shape
        for r, row in enumerate(rows):
            alone = index.grams(row)[k]
            assert batched[k][r].tolist() == alone.tolist()
            expected = [index.number(row[j - k + 1:j + 1].tolist())
                        if j >= k - 1 and (row[j - k + 1:j + 1] >= 0).all() else -1 for j in range(W)]
            assert alone.tolist() == expected
        assert (batched[k][0, 4:] == index.grams(train[30:35])[k]).all()  # padding changes nothing after it


# ------------------------------------------------------------------ the cache beside a dataset

def counted(monkeypatch) -> list:
    """Record every modified_kneser_ney build load_ngram does."""
    calls, real = [], ngram.modified_kneser_ney

    def build(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(ngram, "modified_kneser_ney", build)
    return calls


def assert_same_model(a: ngram.InterpolatedKneserNey, b: ngram.InterpolatedKneserNey, val: np.ndarray) -> None:
    np.testing.assert_array_equal(a.token_probabilities(val), b.token_probabilities(val))
    np.testing.assert_array_equal(a.leave_one_out, b.leave_one_out)
    histories = [val[:3].tolist(), [], val[40:45].tolist()]
    np.testing.assert_array_equal(a.next_distributions(histories, "cpu", torch.float64).numpy(),
                                  b.next_distributions(histories, "cpu", torch.float64).numpy())


@pytest.fixture
def corpus():
    rng = np.random.default_rng(6)
    return skewed_ids(rng, 20, 3000), skewed_ids(rng, 21, 400), 21  # train, val, vocab


def test_load_ngram_writes_the_cache_then_reads_it_without_building(tmp_path, monkeypatch, corpus):
    train, val, vocab = corpus
    built = load_ngram(tmp_path, train, vocab, "prep-a", order=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache-ngram-o4.npz"]
    assert_same_model(built, modified_kneser_ney(train, vocab, 4), val)

    def no_build(*args, **kwargs):
        raise AssertionError("load_ngram rebuilt a model its cache holds")
    monkeypatch.setattr(ngram, "modified_kneser_ney", no_build)
    loaded = load_ngram(tmp_path, train, vocab, "prep-a", order=4)
    assert_same_model(loaded, built, val)
    assert loaded.order == 4 and loaded.vocab_size == vocab


def test_load_ngram_rebuilds_for_another_preparation_vocabulary_or_order(tmp_path, monkeypatch, corpus):
    train, val, vocab = corpus
    calls = counted(monkeypatch)
    load_ngram(tmp_path, train, vocab, "prep-a", order=4)
    load_ngram(tmp_path, train, vocab, "prep-a", order=4)
    assert len(calls) == 1
    other = train[::-1].copy()
    rebuilt = load_ngram(tmp_path, other, vocab, "prep-b", order=4)
    assert len(calls) == 2
    assert_same_model(rebuilt, modified_kneser_ney(other, vocab, 4), val)
    assert_same_model(load_ngram(tmp_path, train, vocab, "prep-b", order=4), rebuilt, val)  # now cached
    assert len(calls) == 2
    load_ngram(tmp_path, other, vocab + 1, "prep-b", order=4)
    assert len(calls) == 3
    load_ngram(tmp_path, other, vocab + 1, "prep-b", order=3)
    assert len(calls) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache-ngram-o3.npz", "cache-ngram-o4.npz"]


@pytest.mark.parametrize("keep", ["nothing", "ten bytes", "half", "all but the last byte"])
def test_load_ngram_rebuilds_over_a_damaged_cache(tmp_path, monkeypatch, corpus, keep):
    train, val, vocab = corpus
    good = load_ngram(tmp_path, train, vocab, "prep-a", order=4)
    path = tmp_path / "cache-ngram-o4.npz"
    data = path.read_bytes()
    path.write_bytes(data[:{"nothing": 0, "ten bytes": 10, "half": len(data) // 2,
                            "all but the last byte": len(data) - 1}[keep]])
    calls = counted(monkeypatch)
    assert_same_model(load_ngram(tmp_path, train, vocab, "prep-a", order=4), good, val)
    assert len(calls) == 1
    assert path.read_bytes() == data  # written again, whole
    load_ngram(tmp_path, train, vocab, "prep-a", order=4)
    assert len(calls) == 1


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_an_interrupted_cache_write_leaves_no_file(tmp_path, monkeypatch, capsys, corpus, failure):
    train, val, vocab = corpus
    real_savez = np.savez

    def dies_half_way(file, **arrays):
        buffer = io.BytesIO()
        real_savez(buffer, **arrays)
        with open(file, "wb") as f:
            f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        if failure is OSError:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez", dies_half_way)
    if failure is OSError:  # a full disk: the model still comes back, with a note
        model = load_ngram(tmp_path, train, vocab, "prep-a", order=4)
        assert_same_model(model, modified_kneser_ney(train, vocab, 4), val)
        assert "cannot cache the n-gram" in capsys.readouterr().err
    else:
        with pytest.raises(KeyboardInterrupt):
            load_ngram(tmp_path, train, vocab, "prep-a", order=4)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(np, "savez", real_savez)
    load_ngram(tmp_path, train, vocab, "prep-a", order=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache-ngram-o4.npz"]


def test_a_read_only_dataset_folder_still_gives_the_model(tmp_path, monkeypatch, capsys, corpus):
    train, val, vocab = corpus
    folder = tmp_path / "data"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):  # root writes anyway: fail the way the OS does for everyone else
            def denied(file, **arrays):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            monkeypatch.setattr(np, "savez", denied)
        model = load_ngram(folder, train, vocab, "prep-a", order=4)
        err = capsys.readouterr().err
        assert f"cannot cache the n-gram in {folder}" in err and len(err.strip().splitlines()) == 1
        assert_same_model(model, modified_kneser_ney(train, vocab, 4), val)
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


# ------------------------------------------------------------------ the cache part

@pytest.mark.parametrize("size", [1, 2, 7, 50, 299, 300, 1000])
def test_cache_probabilities_count_the_recent_tokens(size):
    rng = np.random.default_rng(size)
    ids = rng.integers(0, 12, 300).astype(np.uint16)
    got = cache_probabilities(ids, size)
    tokens = ids.tolist()
    expected = []
    for i, token in enumerate(tokens):
        recent = tokens[max(0, i - size):i]
        expected.append(recent.count(token) / len(recent) if recent else 0.0)
    assert got.shape == (len(ids),)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    assert got[0] == 0 and (got[1:] > 0).any()


def test_cache_probabilities_of_a_repeated_token_and_a_single_one():
    np.testing.assert_array_equal(cache_probabilities(np.array([5, 5, 5, 5]), 2), [0, 1, 1, 1])
    np.testing.assert_array_equal(cache_probabilities(np.array([3, 1, 3, 2, 3]), 2), [0, 0, 0.5, 0, 0.5])
    np.testing.assert_array_equal(cache_probabilities(np.array([4]), 10), [0])


# ------------------------------------------------------------------ the weights

def drawn_mixture(seed: int, weights: list[float], n: int = 20000, vocab: int = 12) -> np.ndarray:
    """(K, n): each known component's probability of tokens drawn from the true mixture with `weights`;
    the components differ per position, like a model's distributions over a text."""
    rng = np.random.default_rng(seed)
    components = rng.dirichlet(np.full(vocab, 0.3), size=(len(weights), n))  # (K, n, V)
    which = rng.choice(len(weights), size=n, p=weights)
    cumulative = components[which, np.arange(n)].cumsum(axis=1)
    tokens = np.minimum((cumulative < rng.random(n)[:, None]).sum(axis=1), vocab - 1)
    return components[:, np.arange(n), tokens]


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.7, 0.3], [0.2, 0.5, 0.3]])
def test_fit_weights_recovers_the_true_mixture(weights):
    parts = drawn_mixture(len(weights) * 10 + int(weights[0] * 10), weights)
    fitted = fit_weights(parts)
    assert fitted.shape == (len(weights),)
    assert abs(fitted.sum() - 1.0) < 1e-12 and fitted.min() >= 0
    np.testing.assert_allclose(fitted, weights, rtol=0, atol=0.03)
    loss = mixture_loss(parts, fitted)
    singles = [mixture_loss(parts, np.eye(len(weights))[k]) for k in range(len(weights))]
    assert loss < min(singles) - 0.05
    rng = np.random.default_rng(0)
    for _ in range(20):  # a maximum: no nearby weights do better
        nearby = np.maximum(fitted + rng.normal(0, 0.02, len(weights)), 0)
        assert mixture_loss(parts, nearby / nearby.sum()) >= loss - 1e-9


def test_fit_weights_never_does_worse_than_the_best_single_part():
    rng = np.random.default_rng(7)
    n = 5000
    good = rng.uniform(0.2, 0.9, n)
    parts = np.stack([good, good * rng.uniform(0.01, 0.2, n), np.where(rng.random(n) < 0.1, 0.0, 0.3)])
    fitted = fit_weights(parts)
    assert abs(fitted.sum() - 1.0) < 1e-12 and fitted.min() >= 0
    singles = [mixture_loss(parts, np.eye(3)[k]) for k in range(3)]
    # EM stops once the weights move by < 1e-7, a hair short of an optimum on the simplex's edge
    assert mixture_loss(parts, fitted) <= min(singles) + 1e-6
    assert fitted[0] > 0.8  # the part that is always better gets almost all the weight
    same = fit_weights(np.stack([good, good]))
    np.testing.assert_allclose(same, [0.5, 0.5], atol=1e-12)


def test_two_fold_loss_is_close_to_and_on_average_above_the_fitted_loss():
    gaps = []
    for seed in range(8):
        parts = drawn_mixture(100 + seed, [0.3, 0.7], n=4000)
        fitted = mixture_loss(parts, fit_weights(parts))
        held_out = two_fold_loss(parts)
        assert abs(held_out - fitted) < 0.01
        gaps.append(held_out - fitted)
    assert np.mean(gaps) > 0


# ------------------------------------------------------------------ a GPT, token by token

def window_start(t: int, block: int, context: int) -> int:
    """The start of the first window that scores target t: windows start at multiples of the stride
    block - context, and one starting at s > 0 scores the targets s+context+1 .. s+block."""
    stride = block - context
    return 0 if t <= block else math.ceil((t - block) / stride) * stride


@torch.no_grad()
def one_forward_per_target(model, ids: np.ndarray, context: int) -> np.ndarray:
    block = model.config.block_size
    out = []
    for t in range(1, len(ids)):
        start = window_start(t, block, context)
        assert min(t, context) <= t - start <= block
        logits, _ = model(torch.from_numpy(ids[start:t].astype(np.int64))[None])  # (1, 1, V)
        out.append(torch.log_softmax(logits[0, -1].double(), dim=-1)[int(ids[t])].item())
    return np.array(out)


@pytest.mark.parametrize("n_tokens, context, batch_size", [(70, 5, 3), (45, 0, 1), (17, 15, 16), (2, 3, 2),
                                                           (49, 8, 2), (16, 4, 4)])
def test_token_log_probs_match_one_forward_per_target(n_tokens, context, batch_size, one_thread):
    model = tiny_gpt()
    ids = np.random.default_rng(n_tokens + context).integers(0, 50, n_tokens).astype(np.uint16)
    model.train()
    got = token_log_probs(model, ids, context=context, batch_size=batch_size)
    assert model.training  # left as it was found
    assert got.dtype == np.float64 and got.shape == (n_tokens - 1,)
    model.eval()
    np.testing.assert_allclose(got, one_forward_per_target(model, ids, context), rtol=0, atol=2e-5)
    assert whole_split_loss(model, ids, context=context, batch_size=batch_size) == -got.mean()
    other_batch = token_log_probs(model, ids, context=context, batch_size=batch_size + 5)
    np.testing.assert_allclose(other_batch, got, rtol=0, atol=2e-5)


def test_memory_parts_line_up_with_the_gpt_targets():
    rng = np.random.default_rng(8)
    train, val = skewed_ids(rng, 10, 2000), skewed_ids(rng, 10, 300)
    counts = modified_kneser_ney(train, 10, 3)
    parts = mixture.memory_parts(counts, val, cache_size=20, pair_cache_size=30)
    assert parts.shape == (3, len(val) - 1)
    np.testing.assert_array_equal(parts[0], counts.token_probabilities(val)[1:])
    np.testing.assert_array_equal(parts[1], cache_probabilities(val, 20)[1:])
    np.testing.assert_array_equal(parts[2], mixture.pair_cache_probabilities(val, 30)[1:])
