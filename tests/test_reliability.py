"""Issue 21, sections 2-4: nothing a user keeps is dropped, no input reaches a traceback, messages say what to do.

Each case runs the scripts as a user would (subprocesses on real files, a tiny corpus and a tiny trained run)."""
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import train
from novelgpt.checkpoint import check_vocab
from conftest import ENV, ROOT, TinyRun
from novelgpt.preparing import prepare
from novelgpt.runtime import Runtime
from novelgpt.tokenizer import Tokenizer
from novelgpt.trainsettings import DEFAULTS

NAMES = ["宝玉", "黛玉", "宝钗", "凤姐"]


def story(n: int = 600, seed: int = 0) -> str:
    """A patterned Chinese text, long enough for a val split of a few blocks of 32."""
    return "\n".join(f"{NAMES[(k + seed) % 4]}笑道：“今日第{k % 10}回，{NAMES[(k + 1) % 4]}来了。”" for k in range(n))


def cli(script: str, *args: str, cwd: Path, stdin: bytes | None = None, limit_memory: int = 0,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """One of the scripts as a user runs it; arguments may be bytes (what a terminal can send)."""
    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_memory, limit_memory))
    result = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, env=ENV,
                            input=stdin, timeout=timeout, preexec_fn=limited if limit_memory else None)
    result.stdout, result.stderr = (result.stdout.decode("utf-8", "replace"),
                                    result.stderr.decode("utf-8", "replace"))
    return result


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """The error line of a run that must have ended with status 2 and one line naming `words`."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    line = result.stderr.strip()
    assert line.startswith("error: "), line
    for word in words:
        assert word in line, (word, line)
    return line


TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--gradient_accumulation_steps=1", "--eval_iters=2", "--eval_interval=4", "--log_interval=1",
        "--device=cpu", "--compile=False", "--dtype=float32"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, one_thread_per_module: None) -> Path:
    """A folder with data/tiny (prepared) and out/ (a tiny model trained 8 iterations on it by train.py, so
    with its metrics.jsonl, loss.png and last.pt)."""
    root = tmp_path_factory.mktemp("work")
    (root / "tiny.txt").write_text(story(), encoding="utf-8")
    prepare(str(root / "tiny.txt"), "tiny", vocab_size=120, block_size=32, data_dir=str(root / "data"))
    config = dict(DEFAULTS, dataset="tiny", data_dir=str(root / "data"), out_dir=str(root / "out"),
                  n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, gradient_accumulation_steps=1,
                  max_iters=8, eval_interval=4, eval_iters=2, log_interval=1, device="cpu", dtype="float32",
                  compile=False)
    train.train(config)
    return root


def copy_run(work: Path, tmp_path: Path) -> Path:
    shutil.copytree(work / "out", tmp_path / "out")
    return tmp_path / "out"


def train_args(work: Path, out: Path, *more: str) -> list[str]:
    return ["--dataset=tiny", f"--data_dir={work / 'data'}", f"--out_dir={out}", *TINY, *more]


# ------------------------------------------------------------------ section 2: what a user keeps

@pytest.mark.slow
def test_overwrite_that_runs_out_of_memory_keeps_the_old_run_whole(work, tmp_path):
    out = copy_run(work, tmp_path)
    before = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "loss.png", "ckpt.pt", "last.pt")}
    # a batch that cannot fit in 2 GB of address space: the first evaluation runs out of memory
    result = cli("train.py", *train_args(work, out, "--overwrite=True", "--batch_size=200000", "--max_iters=4"),
                 cwd=tmp_path, limit_memory=2 << 30)
    one_line_error(result, "out of memory (tried to allocate", "GB)", "--batch_size (now 200000)", "--block_size")
    assert {name: (out / name).read_bytes() for name in before} == before  # history and model both kept
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    # a run that does save replaces the history with its own
    result = cli("train.py", *train_args(work, out, "--overwrite=True", "--max_iters=2"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["iter"] for r in records) == 2 and [r["iter"] for r in records if "val_loss" in r] == [0, 2]


@pytest.mark.slow
def test_prepare_reads_subfolders_in_path_order_and_says_how_many(tmp_path):
    chapters = tmp_path / "chapters"
    texts = {"a/b/ch1.txt": story(300, 0), "a/ch2.txt": story(300, 1), "c.txt": story(300, 2),
             ".git/notes.txt": "不是小说", "x/y/z/ch3.TXT": story(300, 3)}
    for name, text in texts.items():
        (chapters / name).parent.mkdir(parents=True, exist_ok=True)
        (chapters / name).write_text(text, encoding="utf-8")
    result = cli("prepare.py", str(chapters), "--name=novel", "--block_size=32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "read 4 .txt file(s) from" in result.stdout and "(3 in subfolders)" in result.stdout
    assert "4 document(s)" in result.stdout
    meta = json.loads((tmp_path / "data" / "novel" / "meta.json").read_text(encoding="utf-8"))
    order = ["a/b/ch1.txt", "a/ch2.txt", "c.txt", "x/y/z/ch3.TXT"]
    assert meta["source_sha256"] == hashlib.sha256(b"".join((chapters / n).read_bytes() for n in order)).hexdigest()
    # a folder with only subfolders is read too; one with no .txt anywhere says it looked in subfolders
    shutil.rmtree(chapters / "a"), (chapters / "c.txt").unlink()
    result = cli("prepare.py", str(chapters), "--name=novel2", "--block_size=32", cwd=tmp_path)
    assert result.returncode == 0 and "read 1 .txt file(s)" in result.stdout, result.stderr
    shutil.rmtree(chapters / "x")
    one_line_error(cli("prepare.py", str(chapters), "--name=novel3", cwd=tmp_path), "has no .txt files",
                   "subfolders")


def test_readme_says_config_files_run_and_what_exit_statuses_mean():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "A config file (`config/novel_cpu.py`) is a Python program" in readme
    assert "0 done; 2 your mistake" in readme and "130 stopped by Ctrl-C (SIGINT) and 143 by SIGTERM" in readme


# ------------------------------------------------------------------ section 3: one line instead of a traceback

@pytest.mark.slow
def test_inputs_that_are_not_regular_files_or_too_large_are_refused_before_reading(tmp_path):
    one_line_error(cli("prepare.py", "/dev/zero", "--name=zero", cwd=tmp_path), "/dev/zero is not a regular file")
    os.mkfifo(tmp_path / "pipe.txt")
    one_line_error(cli("prepare.py", str(tmp_path / "pipe.txt"), cwd=tmp_path), "is not a regular file")
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:  # sparse: as large as this machine's memory, no disk used
        f.truncate(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    one_line_error(cli("prepare.py", str(huge), cwd=tmp_path), "GB", "in memory", "smaller file")
    one_line_error(cli("train.py", "/dev/zero", cwd=tmp_path), "config file /dev/zero is not a regular file")
    one_line_error(cli("sample.py", "--start=FILE:/dev/zero", cwd=tmp_path), "/dev/zero is not a regular file")


@pytest.mark.slow
@pytest.mark.parametrize("script, option, words", [
    ("train.py", "config: learning_rate = float('nan')", ["c.py: --learning_rate expects a finite number, got nan"]),
    ("train.py", "--epochs=1e999", ["--epochs expects a finite number, got inf"]),
    ("train.py", "--max_iters=100000000000000000000000", ["--max_iters is out of range", "64 bits"]),
    ("train.py", "--seed=-1", ["--seed must be in 0..2**63-1"]),
    ("sample.py", "--temperature=1e999", ["--temperature expects a finite number, got inf"]),
    ("sample.py", "--top_p=-1e400", ["--top_p expects a finite number, got -inf"]),
    ("sample.py", "--seed=1e400", ["--seed expects an integer"]),
    ("sample.py", "--temperature=1e-300", ["temperature must be 0 (the likeliest token) or in 0.001..1000"]),
    ("sample.py", "--repetition_penalty=1e300", ["repetition_penalty must be in 0.01..100"]),
    ("sample.py", "--num_samples=1000000", ["num_samples must be in 1..4096"]),
    ("evaluate.py", "--context=9999999999999999999999", ["--context is out of range"]),
    ("prepare.py", "--vocab_size=99999999999", ["--vocab_size must be in 6..4,294,967,296"]),
    ("prepare.py", "--val_fraction=1e309", ["--val_fraction expects a finite number"]),
])
def test_numbers_out_of_range_are_one_line_where_they_are_parsed(tmp_path, script, option, words):
    if option.startswith("config: "):  # NaN cannot be typed as a literal, but a config file can compute it
        (tmp_path / "c.py").write_text(option.removeprefix("config: ") + "\n")
        option = "c.py"
    one_line_error(cli(script, option, cwd=tmp_path), *words)


@pytest.mark.slow
def test_a_model_larger_than_the_machine_is_refused_before_it_is_built(work, tmp_path):
    one_line_error(cli("train.py", *train_args(work, tmp_path / "o", "--n_layer=1000000000"), cwd=tmp_path),
                   "needs", "GB for its weights, gradients and optimizer state alone", "lower --n_layer or --n_embd")
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_names_the_file_system_refuses(work, tmp_path):
    (tmp_path / "novel.txt").write_text(story(), encoding="utf-8")
    one_line_error(cli("prepare.py", "novel.txt", f"--name={'长' * 100}", cwd=tmp_path), "--dataset", "300 bytes long",
                   "at most 223")
    one_line_error(cli("train.py", *train_args(work, tmp_path / ("o" * 240)), cwd=tmp_path), "--out_dir", "240 bytes")
    one_line_error(cli("export.py", str(work / "out"), str(tmp_path / ("e" * 300)), cwd=tmp_path), "300 bytes")


def damaged_dataset(work: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(work / "data", data)
    ids = np.memmap(data / "tiny" / "train.bin", dtype=np.uint16, mode="r+")
    ids[100] = 60000  # a token id past the 120-token vocabulary, the file size unchanged
    ids.flush()
    return data


@pytest.mark.slow
def test_a_damaged_dataset_is_named_damaged_by_every_script_that_reads_it(work, tmp_path):
    data = damaged_dataset(work, tmp_path)
    args = ["--dataset=tiny", f"--data_dir={data}", f"--out_dir={tmp_path / 'o'}", *TINY, "--max_iters=2"]
    one_line_error(cli("train.py", *args, cwd=tmp_path), "train.bin is damaged", "token id 60,000",
                   "prepare it again")
    one_line_error(cli("evaluate.py", f"--out_dir={work / 'out'}", f"--data_dir={data}", cwd=tmp_path),
                   "train.bin is damaged")


def nan_checkpoint(work: Path, tmp_path: Path) -> Path:
    checkpoint = torch.load(work / "out" / "ckpt.pt", weights_only=True)
    checkpoint["model"]["transformer.h.0.mlp.c_fc.weight"][3, 4] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.pt")
    return tmp_path / "nan.pt"


@pytest.mark.slow
def test_a_nan_weight_is_refused_by_sample_export_and_evaluate(work, tmp_path):
    pt = nan_checkpoint(work, tmp_path)
    for result in (cli("sample.py", f"--init_from={pt}", "--temperature=0", "--max_new_tokens=5", cwd=tmp_path),
                   cli("export.py", str(pt), str(tmp_path / "exp"), cwd=tmp_path)):
        one_line_error(result, "nan.pt is damaged", "1 weight(s) of transformer.h.0.mlp.c_fc.weight are NaN")
    assert not (tmp_path / "exp").exists()
    # a model folder (what export writes, what GPT2-Chinese ships) with a NaN weight
    assert cli("export.py", str(work / "out"), str(tmp_path / "folder"), cwd=tmp_path).returncode == 0
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "folder" / "model.safetensors")
    state["transformer.h.0.attn.c_attn.weight"][0, 0] = float("inf")
    save_file(state, tmp_path / "folder" / "model.safetensors", metadata={"format": "pt"})
    for result in (cli("sample.py", f"--init_from={tmp_path / 'folder'}", "--temperature=0", cwd=tmp_path),
                   cli("export.py", str(tmp_path / "folder"), str(tmp_path / "again"), cwd=tmp_path),
                   cli("evaluate.py", f"--init_from={tmp_path / 'folder'}", f"--text={work / 'tiny.txt'}",
                       cwd=tmp_path)):
        one_line_error(result, "is damaged", "h.0.attn.c_attn.weight are NaN or infinite", "export the model again")


@pytest.mark.slow
def test_damaged_model_folder_files(work, tmp_path):
    folder = tmp_path / "folder"
    assert cli("export.py", str(work / "out"), str(folder), "--format=safetensors", cwd=tmp_path).returncode == 0
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, n_layer=-3)))
    one_line_error(cli("sample.py", f"--init_from={folder}", cwd=tmp_path), "config.json is damaged (n_layer=-3)")
    (folder / "config.json").write_text(json.dumps(config))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])  # cut short
    one_line_error(cli("sample.py", f"--init_from={folder}", cwd=tmp_path), "weights in", "are damaged",
                   "export or download the model again")


@pytest.mark.slow
def test_wandb_with_a_key_but_no_reachable_server_logs_offline_in_seconds(work, tmp_path, monkeypatch, capsys):
    closed = __import__("socket").socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    start = time.monotonic()
    config = dict(DEFAULTS, dataset="tiny", data_dir=str(work / "data"), out_dir=str(tmp_path / "out"),
                  n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, gradient_accumulation_steps=1,
                  max_iters=2, eval_interval=2, eval_iters=1, device="cpu", dtype="float32", compile=False,
                  wandb_log=True)
    train.train(config)
    assert time.monotonic() - start < 60
    printed = capsys.readouterr().out
    assert f"wandb: cannot reach 127.0.0.1:{port}" in printed and "logging offline" in printed
    assert len(list((tmp_path / "out" / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slow
def test_text_that_is_not_utf8_on_the_command_line_and_on_stdin(work, tmp_path):
    result = cli("sample.py", f"--out_dir={work / 'out'}".encode(), b"--start=\xff\xfe\xe5\xae\x9d\xe7\x8e\x89",
                 cwd=tmp_path)
    one_line_error(result, "--start is not valid UTF-8 text (byte 0xff at character 1)")
    result = cli("sample.py", f"--out_dir={work / 'out'}", "--interactive", "--max_new_tokens=3", "--seed=1",
                 "--min_copy=0", cwd=tmp_path, stdin=b"\xff\xfe\n\xe5\xae\x9d\xe7\x8e\x89\n")
    assert result.returncode == 0, result.stderr
    assert "that line is not valid UTF-8 text (byte 0xff at character 1); give it in UTF-8" in result.stderr
    assert "宝玉" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.slow
def test_sigterm_during_a_long_evaluation_stops_within_a_batch(work, tmp_path):
    args = train_args(work, tmp_path / "out", "--eval_iters=1000000", "--max_iters=100")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)
    assert "parameters" in proc.stdout.readline()  # set up: the first evaluation is under way
    time.sleep(1)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert time.monotonic() - sent < 10 and proc.returncode == 143, output
    assert "stopped before the first step; nothing saved" in output and "Traceback" not in output
    assert not (tmp_path / "out" / "last.pt").exists()


# ------------------------------------------------------------------ section 4: messages

@pytest.mark.slow
def test_pickled_weights_in_a_model_folder_never_pass_on_torchs_advice(work, tmp_path):
    folder = tmp_path / "folder"
    assert cli("export.py", str(work / "out"), str(folder), "--format=bin", cwd=tmp_path).returncode == 0

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))
    torch.save({"wte.weight": Payload()}, folder / "pytorch_model.bin")
    line = one_line_error(cli("sample.py", f"--init_from={folder}", cwd=tmp_path), "pickled objects other than tensors",
                          "never loaded")
    assert "weights_only" not in line and not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_utf8_with_bad_bytes_says_where_and_replace_goes_on(tmp_path):
    data = story().encode("utf-8")
    (tmp_path / "cut.txt").write_bytes(data[:-1])  # the last character cut, as head -c does
    at = data.index(b"\n", 3000) + 1  # at the start of a line: no character is split
    (tmp_path / "bad.txt").write_bytes(data[:at] + b"\xff" + data[at:])
    one_line_error(cli("prepare.py", "cut.txt", "--block_size=32", cwd=tmp_path),
                   f"cut.txt is UTF-8 except at byte {len(data) - 3:,}", "--errors=replace")
    one_line_error(cli("prepare.py", "bad.txt", "--block_size=32", cwd=tmp_path), f"UTF-8 except at byte {at:,}",
                   "1 bad byte(s)")
    result = cli("prepare.py", "bad.txt", "--block_size=32", "--errors=replace", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    one_line_error(cli("prepare.py", "bad.txt", "--errors=ignore", cwd=tmp_path), "--errors must be strict or replace")


@pytest.mark.slow
def test_json_lines_broken_at_line_5_says_line_5(tmp_path):
    lines = [json.dumps({"text": story(50, k)}, ensure_ascii=False) for k in range(8)]
    lines[4] = lines[4][:-5]
    (tmp_path / "input.json").write_text("\n".join(lines), encoding="utf-8")
    one_line_error(cli("prepare.py", "input.json", cwd=tmp_path),
                   "neither JSON nor JSON Lines: Unterminated string starting at line 5, column 10")


@pytest.mark.slow
def test_init_from_a_pt_file_and_a_misspelt_word(work, tmp_path):
    result = cli("train.py", *train_args(work, tmp_path / "ft", f"--init_from={work / 'out' / 'ckpt.pt'}",
                                         "--max_iters=2"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    tuned = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    assert tuned["model_args"]["n_embd"] == 32 and tuned["iter_num"] in (0, 2)
    one_line_error(cli("train.py", *train_args(work, tmp_path / "o", "--init_from=scrach"), cwd=tmp_path),
                   "--init_from scrach does not exist; did you mean scratch?")


@pytest.mark.slow
def test_out_dir_in_the_dataset_folder_is_refused_with_a_reason(work, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(work / "data", data)
    line = one_line_error(cli("train.py", "--dataset=tiny", f"--data_dir={data}", f"--out_dir={data / 'tiny'}", *TINY,
                              cwd=tmp_path), "overlap", "--out_dir=out-tiny")
    assert "in use" not in line
    # the files prepare wrote, and the caches (cache-*: the n-gram, the copy index) other runs derived from them
    assert sorted(p.name for p in (data / "tiny").iterdir() if not p.name.startswith("cache-")) == [
        ".lock", "meta.json", "train.bin", "val.bin", "vocab.txt"]


@pytest.mark.slow
def test_evaluate_text_encodings_an_empty_file_and_a_short_model(work, tmp_path):
    (tmp_path / "gbk.txt").write_bytes(story(200, 1).encode("gbk"))
    result = cli("evaluate.py", f"--out_dir={work / 'out'}", "--text=gbk.txt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "read gbk.txt as gb18030" in result.stdout and "scoring with --context=16" in result.stdout
    assert "nats" in result.stdout
    (tmp_path / "empty.txt").write_bytes(b"")
    one_line_error(cli("evaluate.py", f"--out_dir={work / 'out'}", "--text=empty.txt", cwd=tmp_path),
                   "--text empty.txt holds 0 character(s)")
    one_line_error(cli("evaluate.py", f"--out_dir={work / 'out'}", "--context=40", cwd=tmp_path),
                   "--context 40 must be below the model's block_size, 32")


def test_vocab_counts_are_said_the_right_way_round(run: TinyRun):
    small = run.tok
    large = Tokenizer(small.itos + [f"tok{i}" for i in range(1000)])
    n = small.vocab_size
    with pytest.raises(ValueError, match=rf"the vocabulary of big.txt does not match ckpt.pt's \({n + 1000:,} tokens "
                                         rf"against {n};"):
        check_vocab(small, "ckpt.pt", large, "big.txt", "fix")


@pytest.mark.slow
def test_sigint_exits_130_and_the_resume_command_has_one_init_from(work, tmp_path):
    out = copy_run(work, tmp_path)
    args = train_args(work, out, "--init_from", "resume", "--max_iters=1000000", "--eval_interval=1000000")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while proc.stdout.readline().startswith("iter ") is False:
        assert time.monotonic() < deadline and proc.poll() is None
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, output
    command = output.split("resume with:\n", 1)[1].splitlines()[0].strip()
    assert command.count("--init_from") == 1 and command.endswith("--init_from=resume") and "resume --" not in command
    assert train.resume_command(["train.py", "--overwrite", "--init_from", "x", "--init_from=resume"]) == \
        "python train.py --init_from=resume"


@pytest.mark.slow
def test_unwritable_samples_path_is_refused_before_generating(work, tmp_path):
    (tmp_path / "afile").write_text("x")
    for path in (tmp_path / "afile", tmp_path / "afile" / "below"):
        result = cli("sample.py", f"--out_dir={work / 'out'}", "--save_samples", f"--save_samples_path={path}",
                     "--max_new_tokens=3", cwd=tmp_path)
        one_line_error(result, "cannot save the samples", str(path))
        assert result.stdout == ""  # nothing generated first


def read_only(folder: Path, *command: str) -> list[str]:
    """command run with folder mounted read-only, in a mount namespace of its own (nothing to clean up after)."""
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, str(folder), *command]


@pytest.mark.slow
def test_a_read_only_dataset_folder_can_be_trained_on(work, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(work / "data", data)
    (data / "tiny" / ".lock").unlink()  # as copied from a share that never had a writer
    command = read_only(data, sys.executable, str(ROOT / "train.py"),
                        *train_args(work, tmp_path / "out", "--max_iters=2"))
    command[command.index(f"--data_dir={work / 'data'}")] = f"--data_dir={data}"
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "ckpt.pt").exists() and "done: 2 iterations" in result.stdout
    # and with a lock file there, it is taken for reading
    shutil.copy(work / "data" / "tiny" / ".lock", data / "tiny" / ".lock")
    result = subprocess.run(command[:-1] + [f"--out_dir={tmp_path / 'out2'}"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_export_into_a_symlinked_folder_keeps_the_link(work, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "linkdir").symlink_to(tmp_path / "real")
    for _ in range(2):  # a new folder, then replacing an export
        result = cli("export.py", str(work / "out"), "exp/linkdir", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "exp" / "linkdir").is_symlink()
    assert (tmp_path / "real" / "config.json").is_file()
    assert os.listdir(tmp_path / "exp") == ["linkdir"] and sorted(os.listdir(tmp_path)) == ["exp", "real"]


def test_a_diverged_run_never_advises_the_dtype_it_uses():
    config = dict(DEFAULTS)
    advice = {name: train.divergence_advice(config, Runtime("cpu", dtype, False))
              for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                  ("float16", torch.float16))}
    assert "--dtype" not in advice["float32"] and "--warmup_iters" in advice["float32"]
    assert "bfloat16" not in advice["bfloat16"] and "--dtype=float32" in advice["bfloat16"]
    assert "--dtype=bfloat16" in advice["float16"]
    assert all("--learning_rate (now 0.0003)" in a and "--muon_lr (now 0.02)" in a for a in advice.values())


@pytest.mark.slow
def test_a_damaged_copy_index_cache_is_built_again(work, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(work / "data", data)
    pt = tmp_path / "ckpt.pt"
    checkpoint = torch.load(work / "out" / "ckpt.pt", weights_only=True)
    checkpoint["config"]["data_dir"] = str(data)
    torch.save(checkpoint, pt)
    args = [f"--init_from={pt}", "--max_new_tokens=20", "--seed=1"]
    assert cli("sample.py", *args, cwd=tmp_path).returncode == 0  # builds and caches the index
    cache = next(data.glob("tiny/cache-*.npz"))
    with np.load(cache) as cached:
        parts = dict(cached)
    parts["starts"][0] = 10**9  # a start past train.bin, the stamp still right
    np.savez(cache, **parts)
    for damage in ("tampered", "cut"):
        if damage == "cut":
            cache.write_bytes(cache.read_bytes()[:100])
        result = cli("sample.py", *args, cwd=tmp_path)
        assert result.returncode == 0 and "copy check against" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_out_of_memory_is_told_from_other_errors_with_its_figure():
    from novelgpt.runtime import out_of_memory
    with pytest.raises(RuntimeError) as info:
        torch.empty(2**60, dtype=torch.uint8)  # an exabyte: refused by the CPU allocator
    assert out_of_memory(info.value) == f"out of memory (tried to allocate {2**60 / 2**30:.1f} GB)"
    assert out_of_memory(MemoryError()) == "out of memory"
    assert out_of_memory(RuntimeError("probability tensor contains either `inf`, `nan`")) is None
    assert out_of_memory(ValueError("can't allocate memory")) is None


@pytest.mark.parametrize("option, value, words", [
    ("temperature", 1e-300, "temperature must be 0 (the likeliest token) or in 0.001..1000, got 1e-300"),
    ("temperature", 1e300, "temperature must be 0 (the likeliest token) or in 0.001..1000"),
    ("top_p", 1e-9, "top_p must be in (0, 1] (1 = off), got 1e-09 (at least 1e-06)"),
    ("repetition_penalty", 1e-3, "repetition_penalty must be in 0.01..100 (1 = off), got 0.001"),
    ("num_samples", 5000, "num_samples must be in 1..4096 (one batch), got 5000"),
])
def test_sampling_bounds_are_one_definition_that_help_and_the_request_body_share(option, value, words, capsys):
    import sample
    import serve
    from novelgpt.engine import SamplingSettings
    with pytest.raises(ValueError, match=re.escape(words)):
        SamplingSettings(**{option: value}).check()
    assert SamplingSettings(temperature=0).check() is None  # 0 stays the likeliest token
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    printed = capsys.readouterr().out
    assert "else in 0.001..1000" in printed and "in 0.01..100" in printed
    # the request body keeps the server's tighter limits, below the command line's
    body = serve.request_model(serve.Limits(), 100, SamplingSettings())
    for name, too_large in (("temperature", 6), ("repetition_penalty", 11), ("num_samples", 5)):
        with pytest.raises(ValidationError):
            body(prompt="宝玉", **{name: too_large})
    body(prompt="宝玉", temperature=5, repetition_penalty=10, num_samples=4)
