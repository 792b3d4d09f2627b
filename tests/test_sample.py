"""sample.py end to end on a tiny checkpoint built here: CLI forms, GPT2-Chinese aliases, batching,
streaming, seeds, the samples file, special tokens, the interactive loop and every user error.
GPT2-Chinese's own generate.py command is tested in test_gpt2chinese.py."""

import io
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import sample as sample_py
from novelgpt.checkpoint import load_model
from conftest import ENV, gpt2_chinese_folder
from novelgpt.engine import Engine, SamplingSettings
from model import GPT, GPTConfig
from novelgpt.runtime import pick_dtype
from novelgpt.gpt2chinese_generate import header as sample_header
from sample import format_samples, sample, save_samples
from novelgpt.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT = "苏落妩媚一笑，南宫流云淡淡道：“你想干嘛？”\n宝玉笑道：“妹妹好。”黛玉冷笑一声。"
PROMPT = "苏落妩媚一笑"
FIGURES = re.compile(r"^(\d+) tokens in ([\d.]+) s, ([\d.]+) tokens/s \((\d+) sample\(s\), seed (\d+)\)$", re.M)
# the subprocesses run a tiny model: one thread avoids waiting on a busy second core

pytestmark = pytest.mark.usefixtures("one_thread")


def build_model(tok: Tokenizer, cls_logit: float) -> GPT:
    """A tiny GPT whose next-token logits are a fixed bias plus a context-dependent part.

    [UNK] and [PAD] get the largest bias, so they would dominate if they were not banned; cls_logit
    decides whether a sample tends to end early ([CLS] = end of text); [MASK] never comes out.
    """
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, bias=True)
    model = GPT(config)
    with torch.no_grad():
        # final LayerNorm: dimension 0 is always 1, so column 0 of the (tied) output matrix is a bias
        model.transformer.ln_f.weight[0] = 0.0
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[:, 1:] *= 10  # context-dependent logits with a spread of about 0.8
        bias = torch.zeros(tok.vocab_size)
        bias[[tok.unk_id, tok.pad_id]] = 8.0
        bias[tok.mask_id] = -30.0
        bias[tok.cls_id] = cls_logit
        model.lm_head.weight[:, 0] = bias
    return model


def save_checkpoint(model: GPT, tok: Tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True)
    model_args = {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}
    torch.save({"model": model.state_dict(), "model_args": model_args, "vocab": tok.to_meta(),
                "config": {"out_dir": str(out_dir)}, "iter_num": 0, "best_val_loss": 3.0}, out_dir / "ckpt.pt")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """out/ (never ends early), out_eos/ (ends early often), and a GPT2-Chinese folder of out/'s model."""
    root = tmp_path_factory.mktemp("sample")
    tok = Tokenizer.build(Counter(TEXT), vocab_size=64)
    model = build_model(tok, cls_logit=-30.0)
    save_checkpoint(model, tok, root / "out")
    save_checkpoint(build_model(tok, cls_logit=4.0), tok, root / "out_eos")
    gpt2_chinese_folder(model, root / "gpt2chinese" / "model" / "final_model")
    (root / "gpt2chinese" / "cache").mkdir()
    (root / "gpt2chinese" / "cache" / "vocab_small.txt").write_text(tok.vocab_file_text(), encoding="utf-8")
    return root


def load(setup, name="out"):
    model, tok, _ = load_model(str(setup / name), device="cpu", dtype=pick_dtype("auto", "cpu", "decode"))
    return Engine(model), tok


def generate(engine, tok, prompt, on_text=None, **settings):
    return sample(engine, tok, prompt, SamplingSettings(**settings), on_text=on_text)


def run_cli(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, encoding="utf-8", timeout=120)


def expected_stdout(texts):
    """What the terminal shows: sample 1 streamed (under a header when there are several), then the rest."""
    if len(texts) == 1:
        return texts[0] + "\n"
    return (f"{sample_header(1)}\n\n{texts[0]}\n"
            + "".join(f"\n{sample_header(n)}\n\n{text}\n" for n, text in enumerate(texts[1:], 2)))


@pytest.mark.slow
def test_cli_both_override_forms_batch_and_saved_file(setup):
    saved = setup / "saved"
    args = [f"--out_dir={setup / 'out'}", "--start", PROMPT, "--num_samples", "3", "--max_new_tokens=40",
            "--seed=7", "--device", "cpu", "--save_samples", "--save_samples_path", str(saved)]
    result = run_cli(args, setup)
    assert result.returncode == 0, result.stderr
    figures = FIGURES.search(result.stderr)
    assert figures and figures.group(1) == "120" and figures.group(4) == "3" and figures.group(5) == "7"
    assert float(figures.group(3)) > 0

    # the same seed in this process gives the same three samples, and the terminal showed exactly them
    model, tok = load(setup)
    texts = generate(model, tok, PROMPT, num_samples=3, max_new_tokens=40, seed=7).texts
    assert result.stdout == expected_stdout(texts)
    assert len(set(texts)) == 3 and all(t.startswith(PROMPT) and len(t) > len(PROMPT) + 30 for t in texts)

    content = (saved / "samples.txt").read_text(encoding="utf-8")
    blocks = re.findall(r"={40} SAMPLE (\d+) ={40}\n\n(.*?)\n\n={90}\n\n", content, re.S)
    assert [n for n, _ in blocks] == ["1", "2", "3"]
    assert [text for _, text in blocks] == [t.strip() for t in texts]
    assert content == format_samples(texts)

    # the next run writes a new file and leaves the first one alone
    sample_py.main(args)
    assert (saved / "samples.txt").read_text(encoding="utf-8") == content
    assert (saved / "samples_2.txt").read_text(encoding="utf-8") == content
    assert sorted(os.listdir(saved)) == ["samples.txt", "samples_2.txt"]


def test_streamed_text_equals_returned_text_and_seed_reproduces(setup, capsys):
    model, tok = load(setup)
    pieces = []
    first = generate(model, tok, "[CLS]" + PROMPT, num_samples=2, max_new_tokens=60, seed=3, on_text=pieces.append)
    assert "".join(pieces) == first.texts[0] and first.texts[0].startswith(PROMPT)
    assert generate(model, tok, "[CLS]" + PROMPT, num_samples=2, max_new_tokens=60, seed=3).texts == first.texts
    assert generate(model, tok, "[CLS]" + PROMPT, num_samples=2, max_new_tokens=60, seed=4).texts != first.texts

    vocab = str(setup / "gpt2chinese" / "cache" / "vocab_small.txt")  # the checkpoint's own: accepted
    sample_py.main(["--out_dir", str(setup / "out"), "--start", PROMPT, "--max_new_tokens", "25", "--seed", "5",
                    "--device", "cpu", "--vocab", vocab])
    out = capsys.readouterr().out
    assert out == generate(model, tok, PROMPT, max_new_tokens=25, seed=5).texts[0] + "\n"


def test_samples_are_one_batch(setup, monkeypatch):
    model, tok = load(setup)
    batch_sizes = []
    stream = model.stream

    def recording(idx, *args, **kwargs):
        batch_sizes.append(idx.size(0) * kwargs.get("copies", 1))  # the rows generated together
        return stream(idx, *args, **kwargs)

    monkeypatch.setattr(model, "stream", recording)
    result = generate(model, tok, PROMPT, num_samples=3, max_new_tokens=20, seed=1)
    assert batch_sizes == [3] and result.new_tokens == 60 and len(set(result.texts)) == 3


def test_special_tokens_banned_and_end_of_text(setup, monkeypatch):
    model, tok = load(setup, "out_eos")
    generated = []
    stream = model.stream

    def recording(*args, **kwargs):
        for step in stream(*args, **kwargs):
            generated.extend(step.tolist())
            yield step

    monkeypatch.setattr(model, "stream", recording)
    max_new = 50
    ended = generate(model, tok, PROMPT, num_samples=4, max_new_tokens=max_new, top_k=0, seed=2)
    assert tok.unk_id not in generated and tok.pad_id not in generated
    # a generated [CLS] ends its sample and is not part of the text
    assert generated.count(tok.cls_id) == 4 and ended.new_tokens < 4 * max_new
    assert all("\n\n" not in text for text in ended.texts)
    assert all(len(text) < len(PROMPT) + max_new for text in ended.texts)

    generated.clear()
    kept = generate(model, tok, PROMPT, num_samples=4, max_new_tokens=max_new, top_k=0, seed=2, ignore_eos=True)
    assert kept.new_tokens == 4 * max_new and generated.count(tok.cls_id) > 4
    assert tok.unk_id not in generated and tok.pad_id not in generated
    assert any("\n\n" in text for text in kept.texts)  # [CLS] reads as a paragraph break, as in GPT2-Chinese


def test_unknown_prompt_characters_reported_once(setup, capsys):
    sample_py.main(["--out_dir", str(setup / "out"), "--start", "龘苏落😀龘", "--max_new_tokens", "5",
                    "--device", "cpu", "--seed", "1"])
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "not in the vocabulary" in line]
    assert len(notes) == 1 and "'龘' x2" in notes[0] and "'😀' x1" in notes[0] and notes[0].count("[UNK]") == 1
    assert captured.out.startswith("[UNK]苏落[UNK][UNK]")


def test_prompt_from_file_and_interactive_loop(setup, capsys, monkeypatch):
    prompt_file = setup / "prompt.txt"
    prompt_file.write_text("宝玉笑道", encoding="utf-8")
    sample_py.main(["--out_dir", str(setup / "out"), f"--start=FILE:{prompt_file}", "--max_new_tokens", "5",
                    "--device", "cpu"])
    assert capsys.readouterr().out.startswith("宝玉笑道")

    monkeypatch.setattr(sys, "stdin", io.StringIO("黛玉\n\n南宫\n"))
    sample_py.main(["--out_dir", str(setup / "out"), "--interactive", "--max_new_tokens", "8", "--device", "cpu",
                    "--seed", "9"])
    captured = capsys.readouterr()
    model, tok = load(setup)
    first = generate(model, tok, "黛玉", max_new_tokens=8, seed=9).texts[0]
    second = generate(model, tok, "南宫", max_new_tokens=8, seed=10).texts[0]
    assert captured.out == f"> {first}\n> > {second}\n> \n"
    assert len(FIGURES.findall(captured.err)) == 2


def test_default_out_dir_falls_back_to_the_newest_run(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("out-older", "out-novel-cpu"):
        (tmp_path / name).mkdir()
        shutil.copy(setup / "out" / "ckpt.pt", tmp_path / name / "ckpt.pt")
    os.utime(tmp_path / "out-older" / "ckpt.pt", (1, 1))
    sample_py.main(["--start", "苏落", "--device", "cpu", "--max_new_tokens", "3", "--seed", "1"])
    captured = capsys.readouterr()
    assert "using out-novel-cpu/ckpt.pt" in captured.err and captured.out.startswith("苏落")


@pytest.mark.slow
def test_no_checkpoint_error_from_the_command_line(tmp_path):
    result = run_cli(["--out_dir", str(tmp_path / "nothing")], tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: no checkpoint at")
    assert "python train.py" in result.stderr


def write_other_vocab(path: Path, tok: Tokenizer) -> str:
    itos = list(tok.itos)
    itos[10], itos[11] = itos[11], itos[10]
    path.write_text(Tokenizer(itos).vocab_file_text(), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("case", ["no checkpoint", "checkpoint elsewhere", "vocab mismatch", "empty prompt",
                                  "top_p 0", "top_p above 1", "negative temperature", "folder without vocab",
                                  "vocab size differs", "unknown option", "missing vocab file",
                                  "missing prompt file", "corrupt checkpoint", "samples path is a file"])
def test_every_user_error_is_one_line_with_status_2(setup, tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    out, folder = str(setup / "out"), str(setup / "gpt2chinese" / "model" / "final_model")
    tok = Tokenizer.from_vocab_file(setup / "gpt2chinese" / "cache" / "vocab_small.txt")
    if case == "checkpoint elsewhere":
        (tmp_path / "out-other").mkdir()
        (tmp_path / "out-other" / "ckpt.pt").write_bytes(b"")
    small_vocab = tmp_path / "small.txt"
    small_vocab.write_text(Tokenizer.build(Counter("苏落"), vocab_size=20).vocab_file_text(), encoding="utf-8")
    args, words = {
        "no checkpoint": ([], ["no checkpoint at out", "ckpt.pt", "python train.py"]),
        "checkpoint elsewhere": (["--out_dir", "out-novel"], ["no checkpoint at out-novel", "--out_dir out-other"]),
        "vocab mismatch": (["--out_dir", out, "--vocab", write_other_vocab(tmp_path / "v.txt", tok)],
                           ["does not match", "first difference at id 10"]),
        "empty prompt": (["--out_dir", out, "--start", ""], ["empty prompt", "[CLS]"]),
        "top_p 0": (["--out_dir", out, "--top_p", "0"], ["--top_p", "(0, 1]"]),  # GPT2-Chinese's --topp 0 is off
        "top_p above 1": (["--out_dir", out, "--top_p=1.5"], ["--top_p", "(0, 1]"]),
        "negative temperature": (["--out_dir", out, "--temperature", "-0.5"], ["--temperature", "-0.5"]),
        "folder without vocab": (["--model_path", folder], ["vocab.txt", "--tokenizer_path"]),
        "vocab size differs": (["--model_path", folder, "--tokenizer_path", str(small_vocab)],
                               ["20 tokens", "64"]),
        "unknown option": (["--nsample", "3"], ["--nsamples"]),
        "missing vocab file": (["--model_path", folder, "--tokenizer_path", str(tmp_path / "no.txt")],
                               ["vocab file not found"]),
        "missing prompt file": (["--out_dir", out, "--start", f"FILE:{tmp_path / 'no.txt'}"], ["prompt file"]),
        "corrupt checkpoint": (["--init_from", str(small_vocab)], ["cannot load", "small.txt"]),
        "samples path is a file": (["--out_dir", out, "--save_samples", "--save_samples_path", str(small_vocab)],
                                   ["cannot save the samples", "small.txt"]),
    }[case]
    with pytest.raises(SystemExit) as info:
        sample_py.main([*args, "--device", "cpu", "--max_new_tokens", "3"])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1  # nothing generated before the error
    assert captured.err.endswith("\n") and captured.err.splitlines()[-1].startswith("error: ")
    for word in words:
        assert word in captured.err


def test_save_samples_never_overwrites(tmp_path):
    first = save_samples(["苏落妩媚一笑。"], str(tmp_path / "mnt"))
    second = save_samples(["宝玉笑道。", "黛玉"], str(tmp_path / "mnt"))
    assert Path(first).name == "samples.txt" and Path(second).name == "samples_2.txt"
    assert Path(first).read_text(encoding="utf-8") == f"{sample_header(1)}\n\n苏落妩媚一笑。\n\n{'=' * 90}\n\n"
    assert Path(second).read_text(encoding="utf-8").count("SAMPLE") == 2
    assert sorted(os.listdir(tmp_path / "mnt")) == ["samples.txt", "samples_2.txt"]
