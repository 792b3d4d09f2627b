"""footprint.py: the estimate against what autograd and the optimizers really hold; --gpu_memory; --estimate_memory."""
import json
from pathlib import Path

import pytest
import torch

import bench
from novelgpt import preparing
from novelgpt import footprint
import train
from configurator import UserError
from model import GPT, GPTConfig
from novelgpt.optim import make_optimizers, train_step
from novelgpt.runtime import init_runtime
from novelgpt.trainsettings import optimizer_settings, training_shape

ROOT = Path(__file__).resolve().parent.parent

# (n_layer, n_head, n_embd, block_size, micro-batch, vocab, dropout, dtype): the flash path in float32, and the
# math path (attention dropout on the CPU) under bf16 autocast
SHAPES = [(2, 2, 32, 32, 4, 120, 0.0, "float32"), (3, 4, 64, 64, 2, 500, 0.1, "bfloat16")]


def shape_config(n_layer: int, n_head: int, n_embd: int, block_size: int, batch: int, dropout: float,
                 **overrides) -> dict:
    return dict(train.DEFAULTS, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                batch_size=batch, dropout=dropout, **overrides)


def shape_model(config: dict, vocab: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=config["block_size"], vocab_size=vocab, n_layer=config["n_layer"],
                         n_head=config["n_head"], n_embd=config["n_embd"], dropout=config["dropout"])).train()


@pytest.mark.parametrize("shape", SHAPES)
def test_activation_estimate_matches_what_autograd_saves(shape):
    *dims, vocab, dropout, dtype = shape
    config = shape_config(*dims, dropout)
    model = shape_model(config, vocab)
    x, y = torch.randint(0, vocab, (2, config["batch_size"], config["block_size"]))

    def forward() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            return model(x, y)[1]

    measured = footprint.saved_bytes(forward, list(model.parameters()))
    est = footprint.estimate_footprint(training_shape(config, vocab), "cpu", dtype, compiled=False)
    estimated = est.activations + est.weight_copies
    assert est.attention == ("math" if dropout else "flash")
    assert abs(estimated - measured) <= 0.15 * measured, (estimated, measured)
    # the estimate is not just large enough: a micro-batch twice as big is far off the measurement
    doubled = footprint.estimate_footprint(training_shape(config, vocab), "cpu", dtype, compiled=False,
                                     micro_batch=2 * x.size(0))
    assert doubled.activations + doubled.weight_copies > 1.5 * measured


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
@pytest.mark.parametrize("shape", SHAPES)
def test_optimizer_state_estimate_matches_the_optimizers_tensors(shape, optimizer):
    *dims, vocab, dropout, _ = shape
    config = shape_config(*dims, dropout, optimizer=optimizer)
    model = shape_model(config, vocab)
    optimizers = make_optimizers(model, optimizer_settings(config), "cpu")
    rt = init_runtime("cpu", "float32", False)
    x, y = torch.randint(0, vocab, (2, config["batch_size"], config["block_size"]))
    train_step(model, optimizers, torch.amp.GradScaler("cpu", enabled=False), x, y, config["batch_size"], rt, 1.0)
    measured = footprint.optimizer_state_bytes(optimizers)
    est = footprint.estimate_footprint(training_shape(config, vocab), "cpu", "float32", compiled=False)
    assert abs(est.optimizer - measured) <= 0.15 * measured, (est.optimizer, measured)
    assert est.weights == sum(p.numel() * 4 for p in model.parameters())
    assert (est.optimizer < 1.5 * est.weights) == (optimizer == "muon")  # Muon keeps one buffer where AdamW keeps two


def test_a_budget_picks_the_largest_micro_batch_that_fits_and_keeps_tokens_per_step():
    config = shape_config(10, 12, 768, 512, 8, 0.1, gradient_accumulation_steps=4)  # novel_small's shape
    budget = footprint.parse_budget("2GB")
    fitted, line = footprint.fit_to_budget(training_shape(config, 13317), budget, "cpu", "float32", False)
    micro = fitted.batch_size
    assert 1 <= micro < 8 and 32 % micro == 0
    assert fitted.batch_size * fitted.gradient_accumulation_steps == 32  # 16,384 tokens per step, as asked
    assert footprint.estimate_footprint(fitted, "cpu", "float32", False).total <= budget
    next_up = min(d for d in range(micro + 1, 33) if 32 % d == 0)
    bigger = footprint.estimate_footprint(training_shape(config, 13317), "cpu", "float32", False, micro_batch=next_up)
    assert bigger.total > budget
    assert f"micro-batch {micro} x 512 with {32 // micro} accumulation steps" in line and "16,384 tokens" in line
    # a bigger budget may go above the configured micro-batch: fewer accumulation steps, the same tokens
    roomy, _ = footprint.fit_to_budget(training_shape(config, 13317), footprint.parse_budget("64GB"), "cpu", "float32", False)
    assert roomy.batch_size == 32 and roomy.gradient_accumulation_steps == 1


def test_budget_sizes_and_bad_budgets():
    assert footprint.parse_budget("8GB") == 8 * 2**30 == footprint.parse_budget(" 8 gib") == footprint.parse_budget("8")
    assert footprint.parse_budget("7500MB") == 7500 * 2**20 and footprint.parse_budget("0.5G") == 2**29
    for bad in ("lots", "-1GB", "0", "8TB", "GB"):
        with pytest.raises(UserError, match="--gpu_memory must be auto or a size"):
            footprint.parse_budget(bad)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    lines = [f"宝玉笑道：“今日第{k % 10}回，黛玉来了。”" for k in range(600)]
    (root / "tiny.txt").write_text("\n".join(lines), encoding="utf-8")
    preparing.prepare(str(root / "tiny.txt"), "tiny", vocab_size=600, block_size=32, data_dir=str(root))
    return root


@pytest.mark.slow
def test_training_under_a_budget_runs_at_the_chosen_micro_batch(data_dir, tmp_path, capsys):
    config = dict(train.DEFAULTS, dataset="tiny", data_dir=str(data_dir), out_dir=str(tmp_path), n_layer=2,
                  n_head=2, n_embd=32, block_size=32, batch_size=4, gradient_accumulation_steps=2, max_iters=4,
                  eval_interval=4, eval_iters=1, log_interval=1, device="cpu", dtype="float32", compile=False)
    # a budget between the estimates at micro-batch 2 and 4: 2 must be chosen, with twice the accumulation
    shape = training_shape(config, 600)
    low, high = (footprint.estimate_footprint(shape, "cpu", "float32", False, micro_batch=m).total for m in (2, 4))
    assert low < high
    train.train(dict(config, gpu_memory=f"{(low + high) / 2 / 2**20:.3f}MB"))
    out = capsys.readouterr().out
    assert "micro-batch 2 x 32 with 4 accumulation steps (the config: 4 x 2), 256 tokens per step" in out
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["config"]
    assert (saved["batch_size"], saved["gradient_accumulation_steps"]) == (2, 4)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in records if "loss" in r] == [256, 512, 768, 1024]


def test_estimate_memory_flag_prints_the_breakdown_without_gpu_or_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/ here: the vocabulary is the default one and nothing is prepared
    train.main([str(ROOT / "config" / "novel_small.py"), "--estimate_memory"])
    out = capsys.readouterr().out
    for words in ("weights (float32", "optimizer state (Muon momentum + AdamW", "activations saved for backward", "13,317",
                  "micro-batch 8 x 512", "peak allocated", "CUDA context", "total"):
        assert words in out
    assert not (tmp_path / "data").exists() and not (tmp_path / "out-novel-small").exists()
    train.main([str(ROOT / "config" / "novel_small.py"), "--estimate_memory=True", "--gpu_memory=3GB"])
    assert "gpu_memory 3.0 GB: micro-batch 4 x 512 with 8 accumulation steps" in capsys.readouterr().out


def test_bad_gpu_memory_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--estimate_memory", "--gpu_memory=lots", f"--data_dir={tmp_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --gpu_memory must be auto or a size") and "\n" not in err


def test_bench_gpu_without_cuda_says_so_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["gpu", "--iters=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a CUDA GPU" in err and "\n" not in err
