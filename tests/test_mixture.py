"""The memory wherever the model predicts: the engine mixes it into each step, the checkpoint carries its weights,
sample.py / evaluate.py / train.py use and store them, and a re-prepared dataset is refused."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from novelgpt.checkpoint import load_model, read_checkpoint
from novelgpt.memory import load_memory
from conftest import ENV, ROOT, TinyRun
from novelgpt.engine import Engine
from novelgpt.mixture import Memory
from novelgpt.ngram import modified_kneser_ney
from test_engine import ITOS, Successor

pytestmark = pytest.mark.usefixtures("one_thread")


def fixed_memory(train: list[int], vocab: int, weights=(0.4, 0.3, 0.1, 0.2), cache_size: int = 4) -> Memory:
    return Memory(modified_kneser_ney(np.array(train), vocab, 3), np.array(weights), cache_size, pair_cache_size=5)


def test_mix_is_the_weighted_sum_of_the_four_parts():
    vocab = len(ITOS)
    memory = fixed_memory([5, 6, 7, 5, 6, 8, 5, 6, 7] * 3, vocab)
    logits = torch.randn(3, vocab)
    histories = [[5, 6], [7, 7, 5, 9, 9, 9], [9, 8, 9, 7, 9, 8, 9]]
    mixed = memory.mix(logits, histories).exp()
    ngram = memory.counts.next_distributions([h[-2:] for h in histories]).double()
    cache, pairs = torch.zeros(3, vocab, dtype=torch.float64), torch.zeros(3, vocab, dtype=torch.float64)
    for row, history in enumerate(histories):
        for token in history[-4:]:
            cache[row, token] += 1 / len(history[-4:])
        recent = history[-5:]
        followers = [b for a, b in zip(recent[:-1], recent[1:]) if a == recent[-1]]
        for token in followers:
            pairs[row, token] += 1 / len(followers)
    assert pairs[1].sum() == 1 and pairs[0].sum() == 0 and pairs[2, 7] == pairs[2, 8] == 0.5  # as built
    expected = 0.4 * torch.softmax(logits.double(), -1) + 0.3 * ngram + 0.1 * cache + 0.2 * pairs
    assert torch.allclose(mixed.double(), expected, atol=1e-6)


def test_the_pair_cache_of_a_split_matches_a_plain_count():
    from novelgpt.mixture import pair_cache_probabilities
    ids = np.random.default_rng(0).integers(0, 6, 400)
    for size in (2, 3, 10, 1000):
        got = pair_cache_probabilities(ids, size)
        for i in range(1, len(ids)):
            start = max(0, i - size)
            window = ids[start:i]  # the `size` tokens before i; pairs must lie inside them
            context = [j for j in range(len(window) - 1) if window[j] == ids[i - 1]]
            expected = sum(window[j + 1] == ids[i] for j in context) / len(context) if context else 0.0
            assert got[i] == pytest.approx(expected), (size, i)


def test_the_engine_samples_from_the_mixture_and_alone_without_it():
    """Successor's GPT always prefers t + 1; a memory whose counts say 5 -> 9 -> 5 wins at greedy decoding when
    it holds most of the weight, and the engine without one follows the GPT."""
    vocab = len(ITOS)
    rng = np.random.default_rng(0)
    text = [5]
    for _ in range(3000):  # after 5 always 9, after 9 always 5, otherwise any character: counts at every level
        text.append({5: 9, 9: 5}.get(text[-1], int(rng.integers(5, vocab))))
        if rng.random() < 0.2:
            text.append(int(rng.integers(5, vocab)))
    memory = fixed_memory(text, vocab, weights=(0.1, 0.9, 0.0, 0.0))
    prompt = torch.tensor([[5]])
    alone = Engine(Successor()).generate(prompt, 1, temperature=0)
    mixed = Engine(Successor(), memory).generate(prompt, 1, temperature=0)
    assert alone[0, -1].item() == 6 and mixed[0, -1].item() == 9
    # the memory follows each row's own history as it grows (batch of two, several steps)
    steps = Engine(Successor(), memory).generate(torch.tensor([[5], [9]]), 3, temperature=0)
    assert steps[0].tolist() == [5, 9, 5, 9]


def test_a_checkpoint_without_weights_gets_them_fitted_and_one_with_weights_uses_them(run: TinyRun, tmp_path):
    model, tok, metadata = load_model(str(run.out_dir / "ckpt.pt"))
    memory, note = load_memory(str(run.out_dir / "ckpt.pt"), metadata, tok, model)
    assert memory is not None and "weights fitted on" in note
    assert sum(memory.weights) == pytest.approx(1) and memory.weights[1] > 0
    stored = dict(metadata, mixture={"weights": {"gpt": 0.2, "ngram": 0.7, "cache": 0.1}, "order": 3,
                                     "cache_size": 50, "dataset_fingerprint": "x", "val": {}})
    with pytest.raises(Exception, match="was prepared again after .* --refit=True"):
        load_memory(str(run.out_dir / "ckpt.pt"), stored, tok, model)
    from novelgpt.dataset import open_dataset
    stored["mixture"]["dataset_fingerprint"] = open_dataset(str(run.data_dir), "cycle").fingerprint()
    memory, note = load_memory(str(run.out_dir / "ckpt.pt"), stored, tok, model)
    assert memory.weights == [0.2, 0.7, 0.1, 0.0] and memory.counts.order == 3 and memory.cache_size == 50
    assert "stored weights" in note
    assert load_memory(str(run.out_dir / "ckpt.pt"), metadata, tok, model, mode="off")[0] is None
    alone, note = load_memory(str(tmp_path), {}, tok, model)  # a model folder, no --dataset
    assert alone is None and "--dataset" in note


def script(name: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / name), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_evaluate_stores_the_weights_and_sample_uses_them(run: TinyRun, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run.out_dir, out)
    result = script("evaluate.py", f"--out_dir={out}", "--device=cpu", "--context=16", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert set(figures) == {"model", "ngram", "mixture", "two_fold"}
    assert figures["mixture"] <= min(figures["model"], figures["ngram"]) + 1e-6  # EM stops within 1e-7 of a weight of 1
    stored = read_checkpoint(out / "ckpt.pt")["mixture"]
    assert stored["order"] == 5 and sum(stored["weights"].values()) == pytest.approx(1)
    with_memory = script("sample.py", f"--out_dir={out}", "--device=cpu", "--start=天地", "--max_new_tokens=20",
                         "--seed=3", "--min_copy=0")
    alone = script("sample.py", f"--out_dir={out}", "--device=cpu", "--start=天地", "--max_new_tokens=20",
                   "--seed=3", "--min_copy=0", "--ngram=off")
    assert with_memory.returncode == alone.returncode == 0, with_memory.stderr + alone.stderr
    assert "its stored weights" in with_memory.stderr and "the GPT alone (--ngram=off)" in alone.stderr
    bad = script("sample.py", f"--out_dir={out}", "--device=cpu", "--ngram=maybe")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == "error: --ngram must be on or off, got 'maybe'"


@pytest.mark.slow
def test_training_stores_the_mixture_in_ckpt_and_plots_it(run: TinyRun, tmp_path):
    out = tmp_path / "trained"
    result = script("train.py", f"--data_dir={run.data_dir}", "--dataset=cycle", f"--out_dir={out}", "--device=cpu",
                    "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
                    "--gradient_accumulation_steps=1", "--max_iters=20", "--eval_interval=10", "--eval_iters=2",
                    "--compile=False", "--dtype=float32", "--ngram_order=3")
    assert result.returncode == 0, result.stderr[-2000:]
    mixture = read_checkpoint(out / "ckpt.pt")["mixture"]
    assert mixture["order"] == 3 and set(mixture["weights"]) == {"gpt", "ngram", "cache", "pair_cache"}
    assert mixture["val"]["mixture"] <= min(mixture["val"]["model"], mixture["val"]["ngram"]) + 1e-6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert evals and all("val_mixture" in r and "val_ngram" in r for r in evals)
    assert (out / "loss.png").stat().st_size > 0
    assert "the memory: whole val split" in result.stdout
