"""train.py on a tiny model and a tiny prepared corpus (CPU)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from novelgpt import dataset
from novelgpt import preparing
import train
from configurator import UserError, get_config
from conftest import gpt2_chinese_folder
from novelgpt.files import atomic_torch_save
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["宝玉", "黛玉", "宝钗", "凤姐", "袭人", "贾母"]
VERBS = ["笑道", "说道", "叹道", "问道"]


def corpus_text(n: int = 900) -> str:
    """A patterned text: learnable, so loss must fall, and long enough for a val split."""
    lines = []
    for k in range(n):
        who, verb = NAMES[k % len(NAMES)], VERBS[(k // 3) % len(VERBS)]
        lines.append(f"{who}{verb}：“今日第{k % 10}回，{NAMES[(k + 1) % len(NAMES)]}来了。”")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "tiny.txt").write_text(corpus_text(), encoding="utf-8")
    preparing.prepare(str(root / "tiny.txt"), "tiny", vocab_size=120, block_size=32, data_dir=str(root))
    return root


def tiny_config(data_dir: Path, out_dir: Path, **overrides) -> dict:
    config = dict(train.DEFAULTS, dataset="tiny", data_dir=str(data_dir), out_dir=str(out_dir),
                  n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.1, batch_size=4,
                  gradient_accumulation_steps=2, max_iters=30, learning_rate=3e-3, min_lr_ratio=0.1, warmup_iters=5,
                  eval_interval=10, eval_iters=4, log_interval=1, device="cpu", dtype="float32", compile=False)
    config.update(overrides)
    return config


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir: Path) -> dict[int, float]:
    return {r["iter"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


@pytest.mark.slow
def test_loss_goes_down_and_checkpoint_is_complete(data_dir, tmp_path):
    result = train.train(tiny_config(data_dir, tmp_path, max_iters=60, dropout=0.0))
    evals = [r for r in read_metrics(tmp_path) if "val_loss" in r]
    assert evals[0]["iter"] == 0 and evals[-1]["iter"] == 60
    assert abs(evals[0]["val_loss"] - math.log(120)) < 0.5  # starts near ln(vocab)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.5
    assert result["best_val_loss"] == min(r["val_loss"] for r in evals)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])  # everything sample.py needs is inside
    assert ckpt["vocab"]["itos"][:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert ckpt["config"]["n_embd"] == 32 and ckpt["best_val_loss"] == result["best_val_loss"]
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["iter_num"] == 60 and len(last["optimizers"]) == 2 and "rng" in last
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    record = read_metrics(tmp_path)[1]
    assert {"iter", "epoch", "loss", "lr", "ms_per_iter", "tokens_per_s", "seconds"} <= set(record)
    seconds = [r["seconds"] for r in read_metrics(tmp_path)]
    assert seconds == sorted(seconds) and seconds[-1] > 0  # wall time, for loss-against-time curves


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,lr_schedule", [("muon", "wsd"), ("adamw", "cosine"), ("muon", "cosine")])
def test_sigint_then_resume_reproduces_the_uninterrupted_run(data_dir, tmp_path, monkeypatch, optimizer, lr_schedule):
    recipe = dict(optimizer=optimizer, lr_schedule=lr_schedule)
    straight = tmp_path / "straight"
    train.train(tiny_config(data_dir, straight, **recipe))
    expected = train_losses(straight)
    assert len(expected) == 30

    # The same run, interrupted by a real SIGINT during iteration 13, then resumed.
    interrupted = tmp_path / "interrupted"
    real_lr_at = train.lr_factor

    def lr_at_then_interrupt(it, *args):
        if it == 12:  # iteration 13 is starting
            signal.raise_signal(signal.SIGINT)
        return real_lr_at(it, *args)

    monkeypatch.setattr(train, "lr_factor", lr_at_then_interrupt)
    result = train.train(tiny_config(data_dir, interrupted, **recipe))
    assert result["stopped"] and result["iter_num"] == 13
    assert torch.load(interrupted / "last.pt", weights_only=True)["iter_num"] == 13
    monkeypatch.setattr(train, "lr_factor", real_lr_at)
    result = train.train(tiny_config(data_dir, interrupted, init_from="resume", **recipe))
    assert result["iter_num"] == 30 and not result["stopped"]
    assert train_losses(interrupted) == expected  # exactly, dropout included


def simulated_budget_run(monkeypatch, step_seconds: list[float], budget: float = 60.0, setup: float = 10.0,
                         eval_seconds: float = 2.0) -> tuple[float, SimpleNamespace]:
    """Drive LengthPlanner as train() does, on a clock that advances by the given step times (the last one
    repeats) and eval_seconds per evaluation; returns the seconds the run took and the run."""
    now = [setup]
    config = dict(train.DEFAULTS, time_budget=budget, eval_interval=50, lr_schedule="wsd", warmup_iters=0)
    run = SimpleNamespace(config=config, max_iters=100_000, iter_num=0, rt=SimpleNamespace(ddp=False, master=True))
    monkeypatch.setattr(train.LengthPlanner, "clock", staticmethod(lambda: now[0]))
    planner = train.LengthPlanner(run, start=0.0)
    while True:
        if run.iter_num % config["eval_interval"] == 0 or run.iter_num >= run.max_iters:
            now[0] += eval_seconds
            planner.after_eval(run, eval_seconds)
        if run.iter_num >= run.max_iters:
            return now[0], run
        now[0] += step_seconds[min(run.iter_num, len(step_seconds) - 1)]
        run.iter_num += 1
        planner.after_step(run)


def test_time_budget_plans_a_length_that_fills_the_budget(monkeypatch):
    # the first step compiles (20 s); then 0.25 s a step
    seconds, run = simulated_budget_run(monkeypatch, [20.0, 0.25])
    assert 57.0 <= seconds <= 60.0 and run.max_iters < 100_000
    # a machine that slows to 0.5 s a step after 40 steps: re-planned at the next evaluation, and stopped when
    # the budget is spent, within one step of it
    seconds, slowed = simulated_budget_run(monkeypatch, [20.0] + [0.25] * 40 + [0.5])
    assert 55.0 <= seconds <= 60.5 and slowed.max_iters < run.max_iters
    # a budget spent before the first plan ends the run at once, with its final evaluation
    seconds, late = simulated_budget_run(monkeypatch, [70.0, 0.25])
    assert late.max_iters == late.iter_num == 11


@pytest.mark.slow
def test_time_budget_is_kept_by_resume(data_dir, tmp_path, monkeypatch):
    # a simulated clock: 0.125 s per training step (exact in binary), evaluations free, so the plan does not
    # depend on this machine
    steps = [0]
    real_step = train.train_step

    def counted_step(*args, **kwargs):
        steps[0] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", counted_step)
    monkeypatch.setattr(train.LengthPlanner, "clock", staticmethod(lambda: 0.125 * steps[0]))
    config = tiny_config(data_dir, tmp_path, max_iters=100_000, time_budget=6.0, eval_interval=25)
    # planned after 11 steps (1.375 s used, 0.125 s a step): 37 more, 48 in all
    assert train.train(config)["iter_num"] == 48
    # interrupted after the plan was made: resume ends at the planned iteration, not a new plan
    interrupted = tmp_path / "interrupted"
    real_lr_at = train.lr_factor

    def lr_at_then_interrupt(it, *args):
        if it == 11:
            signal.raise_signal(signal.SIGINT)
        return real_lr_at(it, *args)

    monkeypatch.setattr(train, "lr_factor", lr_at_then_interrupt)
    first = train.train(dict(config, out_dir=str(interrupted)))
    assert first["stopped"] and first["iter_num"] == 12
    monkeypatch.setattr(train, "lr_factor", real_lr_at)
    planned = torch.load(interrupted / "last.pt", weights_only=True)["max_iters"]
    assert planned == 48
    resumed = train.train(dict(config, out_dir=str(interrupted), init_from="resume", time_budget=0.5))
    assert resumed["iter_num"] == resumed["max_iters"] == planned


@pytest.mark.slow
def test_sigint_from_outside_saves_and_exits_cleanly(data_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset=tiny", f"--data_dir={data_dir}", f"--out_dir={out}",
           "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=100000",
           "--eval_interval=100000", "--eval_iters=2", "--log_interval=1", "--device=cpu", "--compile=False"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output  # a stopped run says so: 128 + SIGINT
    assert "--init_from=resume" in output and "Traceback" not in output
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert 3 <= ckpt["iter_num"] < 100000


def test_checkpoint_killed_mid_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_torch_save({"iter_num": 1, "weights": torch.arange(1000.0)}, path)

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process is killed here

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"iter_num": 2, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["iter_num"] == 1 and torch.equal(ckpt["weights"], torch.arange(1000.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.slow
def test_epochs_become_iterations(data_dir, tmp_path):
    meta = json.loads((data_dir / "tiny" / "meta.json").read_text(encoding="utf-8"))
    config = tiny_config(data_dir, tmp_path, max_iters=0, epochs=0.5, eval_interval=1000, log_interval=5)
    result = train.train(config)
    tokens_per_iter = 4 * 32 * 2
    assert result["max_iters"] == math.ceil(0.5 * meta["train_tokens"] / tokens_per_iter) == result["iter_num"]
    last = read_metrics(tmp_path)[-2]  # the last log line before the final evaluation
    assert last["epoch"] == pytest.approx(last["tokens"] / meta["train_tokens"])
    assert 0.5 <= result["iter_num"] * tokens_per_iter / meta["train_tokens"] < 0.5 + tokens_per_iter / meta["train_tokens"]


@pytest.mark.slow
def test_fine_tune_from_a_gpt2_chinese_folder(data_dir, tmp_path):
    folder = tmp_path / "final_model"
    gpt2_chinese_folder(GPT(GPTConfig(block_size=64, vocab_size=120, n_layer=1, n_head=2, n_embd=32)), folder)
    (folder / "vocab.txt").write_bytes((data_dir / "tiny" / "vocab.txt").read_bytes())  # the model's vocabulary
    result = train.train(tiny_config(data_dir, tmp_path / "out", init_from=str(folder), max_iters=4))
    assert result["iter_num"] == 4
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["model_args"]["block_size"] == 64
    with pytest.raises(UserError, match="--vocab"):
        gpt2_chinese_folder(GPT(GPTConfig(block_size=64, vocab_size=99, n_layer=1, n_head=2, n_embd=32)), folder)
        train.train(tiny_config(data_dir, tmp_path / "out2", init_from=str(folder)))


@pytest.mark.slow
def test_from_scratch_the_head_trains_on_the_used_tokens_and_saves_a_plain_model(data_dir, tmp_path):
    used = dataset.open_dataset(str(data_dir), "tiny", 32).used_tokens().tolist()
    unused = [t for t in range(120) if t not in used]
    assert len(unused) >= 2 and 0 in unused  # [PAD] never occurs in the text
    for on in (True, False):
        train.train(tiny_config(data_dir, tmp_path / str(on), max_iters=10, used_vocab_head=on))
        rows = torch.load(tmp_path / str(on) / "ckpt.pt", weights_only=True)["model"]["lm_head.weight"][unused]
        assert torch.equal(rows, rows[:1].expand_as(rows)) == on  # off: every unused row trained on its own
        assert torch.load(tmp_path / str(on) / "last.pt", weights_only=True)["used_vocab_head"] == on
    folder = tmp_path / "final_model"  # fine-tuning keeps the whole head: its unused rows hold what it learnt
    gpt2_chinese_folder(GPT(GPTConfig(block_size=64, vocab_size=120, n_layer=1, n_head=2, n_embd=32)), folder)
    (folder / "vocab.txt").write_bytes((data_dir / "tiny" / "vocab.txt").read_bytes())
    train.train(tiny_config(data_dir, tmp_path / "tuned", init_from=str(folder), max_iters=2))
    assert torch.load(tmp_path / "tuned" / "last.pt", weights_only=True)["used_vocab_head"] is False


@pytest.mark.slow
def test_wandb_offline_run_has_the_metrics(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no login
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    train.train(tiny_config(data_dir, out, max_iters=6, eval_interval=3, wandb_log=True, wandb_run_name="tiny-run"))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logs = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for key in (b"val_loss", b"tokens_per_s", b"tiny-run", b"learning_rate"):
        assert key in logs


@pytest.mark.slow
def test_torchrun_two_cpu_processes(data_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), "--dataset=tiny", f"--data_dir={data_dir}", f"--out_dir={out}",
           "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
           "--gradient_accumulation_steps=4", "--max_iters=8", "--eval_interval=4", "--eval_iters=2",
           "--log_interval=1", "--device=cpu", "--dtype=float32", "--compile=False"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es)" in result.stdout and "ranks in sync" in result.stdout
    assert result.stdout.count("iter 8/8") == 1  # only rank 0 logs
    iters = [r["iter"] for r in read_metrics(out) if "loss" in r]
    assert iters == list(range(1, 9))  # one line per iteration: one writer
    assert sorted(p.name for p in out.iterdir()) == [".lock", "ckpt.pt", "last.pt", "loss.png", "metrics.jsonl"]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["iter_num"] == 8
    # 2 processes x 4 rows x 2 accumulation steps each: the same tokens per step as 1 process with 4.
    assert "512 tokens per iteration" in result.stdout


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    real_step, steps = train.train_step, {"n": 0}

    def step_that_diverges(*args):
        steps["n"] += 1
        loss = real_step(*args)
        return loss * float("nan") if steps["n"] >= 5 else loss

    monkeypatch.setattr(train, "train_step", step_that_diverges)
    with pytest.raises(FloatingPointError, match="iteration 5"):
        train.train(tiny_config(data_dir, tmp_path, max_iters=20, eval_interval=3))
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["iter_num"] == 3 and all(torch.isfinite(v).all() for v in last["model"].values())
    result = subprocess.run([sys.executable, "-c", "import sys, train; train.main(sys.argv[1:])",
                             "--dataset=tiny", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}",
                             "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
                             "--max_iters=3", "--learning_rate=1e300", "--warmup_iters=0", "--device=cpu", "--log_interval=1"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: the training loss became nan") and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_a_second_run_into_a_trained_out_dir_is_refused_and_the_model_kept(data_dir, tmp_path):
    train.train(tiny_config(data_dir, tmp_path, max_iters=4, eval_interval=2))
    before = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "last.pt")}
    with pytest.raises(UserError, match="--init_from=resume.*--overwrite=True"):
        train.train(tiny_config(data_dir, tmp_path, max_iters=4))
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    result = train.train(tiny_config(data_dir, tmp_path, max_iters=2, eval_interval=2, overwrite=True))
    assert result["iter_num"] == 2 and [r["iter"] for r in read_metrics(tmp_path) if "val_loss" in r] == [0, 2]


@pytest.mark.slow
def test_resume_refuses_another_shape_and_changed_data(data_dir, tmp_path):
    train.train(tiny_config(data_dir, tmp_path, max_iters=2, eval_interval=2))
    with pytest.raises(UserError, match="--n_layer=3 .the model has 2."):
        train.train(tiny_config(data_dir, tmp_path, max_iters=4, init_from="resume", n_layer=3))
    with pytest.raises(UserError, match="--block_size=64"):
        train.train(tiny_config(data_dir, tmp_path, max_iters=4, init_from="resume", block_size=64))
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(UserError, match="corrupt or was not written by train.py") as info:
        train.train(tiny_config(data_dir, tmp_path, max_iters=4, init_from="resume"))
    assert "weights_only" not in str(info.value)


@pytest.mark.parametrize("override, words", [
    (dict(learning_rate=0.0), "--learning_rate must be above 0"),
    (dict(batch_size=-1), "--batch_size must be above 0"),
    (dict(block_size=0), "--block_size must be above 0"),
    (dict(eval_interval=0), "--eval_interval must be above 0"),
    (dict(gradient_accumulation_steps=0), "--gradient_accumulation_steps must be above 0"),
    (dict(max_iters=-5), "--max_iters must be 0 or more"),
    (dict(n_head=3, n_embd=64), "must be a multiple of --n_head 3"),
    (dict(dropout=2.0), r"--dropout must be in \[0, 1\)"),
    (dict(device="cuda"), "--device=cuda, but this machine has 0 CUDA devices"),
    (dict(device="gpu"), "unknown device 'gpu'"),
    (dict(dtype="float16"), "float16 is not supported on the CPU"),
])
def test_bad_settings_are_one_line_errors_before_any_work(data_dir, tmp_path, override, words):
    with pytest.raises(UserError, match=words):
        train.train(tiny_config(data_dir, tmp_path / "out", **override))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bad_out_dir_and_compile_words_from_the_command_line(data_dir, tmp_path):
    (tmp_path / "a_file").write_text("x")
    base = ["--dataset=tiny", f"--data_dir={data_dir}", "--device=cpu", "--max_iters=1"]
    for args, words in (([f"--out_dir={tmp_path / 'a_file'}"], "--out_dir"),
                        (["--out_dir=/proc/novelgpt-out"], "cannot create --out_dir"),
                        (["--compile=yes"], "--compile expects True or False")):
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), *base, *args], capture_output=True,
                                text=True, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("error: ") and words in result.stderr


@pytest.mark.slow
def test_two_trainers_on_one_out_dir_the_second_is_refused(data_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset=tiny", f"--data_dir={data_dir}", f"--out_dir={out}",
           "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=100000",
           "--eval_interval=100000", "--eval_iters=2", "--log_interval=1", "--device=cpu", "--compile=False"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 2):
            assert first.poll() is None and time.time() < deadline, first.stdout.read()
            time.sleep(0.2)
        second = subprocess.run(cmd + ["--overwrite=True"], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert str(first.pid) in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)


@pytest.mark.slow
def test_adamw_stays_one_flag_and_muon_takes_the_block_matrices(data_dir, tmp_path):
    from novelgpt.optim import Muon, make_optimizers
    from novelgpt.trainsettings import optimizer_settings
    model = GPT(GPTConfig(block_size=32, vocab_size=120, n_layer=2, n_head=2, n_embd=32))
    muon, adamw = make_optimizers(model, optimizer_settings(tiny_config(data_dir, tmp_path)), "cpu")
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    assert in_muon == {id(p) for p in model.transformer.h.parameters() if p.dim() == 2}
    assert id(model.transformer.wte.weight) not in in_muon
    adamw_only = optimizer_settings(tiny_config(data_dir, tmp_path, optimizer="adamw"))
    assert [type(o) for o in make_optimizers(model, adamw_only, "cpu")] == [torch.optim.AdamW]
    result = train.train(tiny_config(data_dir, tmp_path / "a", optimizer="adamw", max_iters=20, dropout=0.0))
    evals = [r["val_loss"] for r in read_metrics(tmp_path / "a") if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.5 and result["iter_num"] == 20


@pytest.mark.slow
def test_patience_says_the_model_memorises_and_early_stop_stops(data_dir, tmp_path, capsys):
    # a learning rate far too high for the tiny model: the val loss stops improving at once
    result = train.train(tiny_config(data_dir, tmp_path, max_iters=60, eval_interval=2, patience=2,
                                     early_stop=True, muon_lr=5.0, learning_rate=1.0, warmup_iters=0))
    out = capsys.readouterr().out
    assert out.count("starting to memorise") == 1 and "stopping (--early_stop)" in out
    assert result["iter_num"] < 60 and result["iter_num"] == result["best_iter"] + 4
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == result["best_iter"]


@pytest.mark.slow
def test_out_of_memory_halves_the_micro_batch_and_loses_no_step(data_dir, tmp_path, monkeypatch, capsys):
    plain = train.train(tiny_config(data_dir, tmp_path / "plain", max_iters=8, eval_interval=4, dropout=0.0))
    real_forward, calls = GPT.forward, {"n": 0}

    def forward_that_runs_out(self, idx, targets=None, **kwargs):
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] in (3, 6) and idx.size(0) > 1:  # the GPU is full on these micro-batches
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(self, idx, targets, **kwargs)

    monkeypatch.setattr(GPT, "forward", forward_that_runs_out)
    result = train.train(tiny_config(data_dir, tmp_path / "oom", max_iters=8, eval_interval=4, dropout=0.0))
    out = capsys.readouterr().out
    assert "redoing the step with micro-batch 2 (4 accumulation steps" in out
    assert "redoing the step with micro-batch 1 (8 accumulation steps" in out
    assert result["iter_num"] == plain["iter_num"] == 8
    tokens = [r["tokens"] for r in read_metrics(tmp_path / "oom") if "loss" in r]
    assert tokens == [r["tokens"] for r in read_metrics(tmp_path / "plain") if "loss" in r]
    # the same rows in smaller micro-batches: the same gradients, up to float rounding
    assert result["val_loss"] == pytest.approx(plain["val_loss"], abs=1e-3)
    assert torch.load(tmp_path / "oom" / "last.pt", weights_only=True)["iter_num"] == 8


@pytest.mark.parametrize("name", ["novel_cpu", "novel_small"])
def test_shipped_configs_are_valid(name):
    config = get_config(train.DEFAULTS, [str(ROOT / "config" / f"{name}.py")], types=train.TYPES)
    train.check_config(config)
    assert config["optimizer"] == "muon" and config["lr_schedule"] == "wsd"
    assert config["early_stop"] and config["patience"] > 0 and config["epochs"] <= 6
