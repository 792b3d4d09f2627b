"""GPT2-Chinese users' commands run unchanged: the seeds' train.py command (scaled down) as a subprocess in a
folder laid out like a GPT2-Chinese checkout, then their generate.py command verbatim; flag mapping; refusals."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from novelgpt import gpt2chinese, gpt2chinese_generate, gpt2chinese_train
import sample as sample_py
import train as train_py
from novelgpt.checkpoint import load_model
from configurator import UserError, get_config
from conftest import ENV, gpt2_chinese_folder
from novelgpt.engine import Engine, SamplingSettings
from model import GPT, GPTConfig
from novelgpt.runtime import pick_dtype
from novelgpt.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["苏落", "南宫流云", "南宫夫人", "韩立"]
VERBS = ["淡淡一笑", "冷哼一声", "妩媚一笑", "说道"]
# the seeds' command, with --epochs 15 scaled down to 1 and our own options after theirs
TRAIN_COMMAND = ("--model_config config/model_config_small.json --tokenized_data_path data/tokenized/ "
                 "--tokenizer_path cache/vocab_small.txt --raw_data_path data/train.json --epochs 1 --log_step 200 "
                 "--stride 512 --output_dir model/ --device 0,1 --num_pieces 100 --raw --dtype=float32 --eval_iters=2")
GENERATE_COMMAND = ["--device", "1", "--length", "1000", "--tokenizer_path", "cache/vocab_small.txt", "--model_path",
                    "model/final_model", "--prefix", "[CLS]苏落妩媚一笑", "--topp", "1", "--temperature", "1.0",
                    "--save_samples", "--save_samples_path", "./mnt/"]
HEADER = re.compile(r"^={40} SAMPLE (\d+) ={40}$", re.M)
FIGURES = re.compile(r"^(\d+) tokens in [\d.]+ s, [\d.]+ tokens/s \((\d+) sample\(s\), seed (\d+)\)$", re.M)


pytestmark = pytest.mark.usefixtures("one_thread")


def articles() -> list[str]:
    """Six patterned articles (paragraphs split by newlines) and one too short for --min_length 128."""
    out = []
    for a in range(6):
        out.append("\n".join(f"{NAMES[(k + a) % 4]}{VERBS[(k // 3) % 4]}：“今日第{k % 10}回，{NAMES[(k + 1) % 4]}来了。”"
                             + (" Hello world, playing." if k % 10 == 0 else "") for k in range(120)))
    return out + ["太短了。"]


def gpt2chinese_vocab(text: str) -> list[str]:
    """A vocabulary shaped like vocab_small.txt: [PAD], [unusedN], the BERT specials, <S> <T>, ASCII, wordpieces,
    then the text's characters; no newline and no space."""
    head = ["[PAD]", *(f"[unused{i}]" for i in range(1, 5)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<S>", "<T>"]
    ascii_part = list("!\"#$%&'()*+,-./0123456789:;<=>?@[\\]^_`abcdefghijklmnopqrstuvwxyz")
    pieces = ["hello", "world", "play", "##ing"]
    return list(dict.fromkeys(head + ascii_part + pieces + sorted(set(text) - {"\n", " "})))


def make_checkout(root: Path) -> Path:
    """A folder laid out like a GPT2-Chinese checkout: cache/vocab_small.txt, config/, data/train.json."""
    for sub in ("cache", "config", "data"):
        (root / sub).mkdir(parents=True)
    texts = articles()
    vocab = gpt2chinese_vocab("".join(texts))
    (root / "cache" / "vocab_small.txt").write_text("\n".join(vocab), encoding="utf-8")  # no final newline, as theirs
    (root / "config" / "model_config_small.json").write_text(json.dumps(dict(
        initializer_range=0.02, layer_norm_epsilon=1e-5, n_ctx=32, n_embd=16, n_head=2, n_layer=1, n_positions=32,
        vocab_size=len(vocab))), encoding="utf-8")
    (root / "data" / "train.json").write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = make_checkout(tmp_path_factory.mktemp("gpt2chinese"))
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *TRAIN_COMMAND.split()], cwd=root, env=ENV,
                            capture_output=True, text=True, encoding="utf-8", timeout=300)
    return root, result


@pytest.mark.slow
def test_seeds_training_command_prepares_trains_and_exports_final_model(trained):
    root, result = trained
    assert result.returncode == 0, result.stderr
    vocab = Tokenizer.from_vocab_file(root / "cache" / "vocab_small.txt")
    meta = json.loads((root / "data" / "train" / "meta.json").read_text(encoding="utf-8"))
    assert meta["itos"] == vocab.itos and meta["documents"] == 6  # the short article is left out
    tokens = np.concatenate([np.fromfile(root / "data" / "train" / f"{split}.bin", dtype=meta["dtype"])
                             for split in ("train", "val")])
    # their wrapping ([MASK] article [CLS]), newline as [SEP], English as wordpieces, as their train.py tokenizes
    assert tokens[0] == vocab.stoi["[MASK]"] and (tokens == vocab.stoi["[CLS]"]).sum() == 6
    assert vocab.stoi["##ing"] in tokens and vocab.stoi["[SEP]"] in tokens and vocab.unk_id not in tokens
    for line in ("--min_length 128: 1 of 7 article(s)", "--tokenized_data_path: accepted, not needed",
                 "--num_pieces: accepted, not needed",
                 "CUDA_VISIBLE_DEVICES=0,1 torchrun --standalone --nproc_per_node=2 train.py --model_config"):
        assert line in result.stderr
    # their step count: epochs x tokens / stride windows, batch_size (8) x gradient_accumulation (1) a step
    expected_iters = math.ceil(meta["train_tokens"] / 512 / 8)
    ckpt = torch.load(root / "model" / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == expected_iters and f"{expected_iters} iterations" in result.stdout
    args = ckpt["model_args"]
    assert (args["n_layer"], args["n_head"], args["n_embd"], args["block_size"], args["vocab_size"]) == \
        (1, 2, 16, 32, vocab.vocab_size)
    assert ckpt["config"]["log_interval"] == 200 and ckpt["config"]["out_dir"] == "model/"

    final = root / "model" / "final_model"
    assert {"config.json", "pytorch_model.bin", "model.safetensors", "vocab.txt"} <= set(os.listdir(final))
    config = json.loads((final / "config.json").read_text(encoding="utf-8"))
    assert (config["n_ctx"], config["n_layer"], config["vocab_size"]) == (32, 1, vocab.vocab_size)
    assert Tokenizer.from_vocab_file(final / "vocab.txt").itos == vocab.itos
    assert (config["bos_token_id"], config["eos_token_id"]) == (vocab.stoi["[MASK]"], vocab.stoi["[CLS]"])
    assert {"tokenizer_config.json", "generation_config.json"} <= set(os.listdir(final))
    exported, _, _ = load_model(str(final))
    best, _, _ = load_model(str(root / "model" / "ckpt.pt"))
    ids = torch.tensor([vocab.encode("[MASK]苏落妩媚一笑").tolist()])
    assert torch.equal(exported(ids)[0], best(ids)[0])  # the best checkpoint, exactly


@pytest.mark.slow
def test_seeds_generate_command_verbatim(trained, capsys, monkeypatch):
    root, result = trained
    assert result.returncode == 0, result.stderr
    monkeypatch.chdir(root)
    sample_py.main(GENERATE_COMMAND)
    captured = capsys.readouterr()
    figures = FIGURES.search(captured.err)
    assert figures and figures.group(1) == "10000" and figures.group(2) == "10"  # nsamples 10 of 1000 tokens

    content = (root / "mnt" / "samples.txt").read_text(encoding="utf-8")
    blocks = re.findall(rf"^={{40}} SAMPLE (\d+) ={{40}}\n(.*?)\n={{90}}\n\n", content, re.S | re.M)
    assert [n for n, _ in blocks] == [str(n) for n in range(1, 11)]
    texts = [text for _, text in blocks]
    assert content == "".join(f"{'=' * 40} SAMPLE {n} {'=' * 40}\n{t}\n{'=' * 90}\n\n" for n, t in enumerate(texts, 1))
    assert all(t.startswith("苏落妩媚一笑") and t == t.strip() for t in texts)
    # the console: each header, a blank line, the text; generate.py's closing rule
    assert captured.out == "".join(f"{'=' * 40} SAMPLE {n} {'=' * 40}\n\n{t}\n" for n, t in enumerate(texts, 1)) \
        + "=" * 80 + "\n"

    # with the printed seed, the first sample is what this model and vocabulary give
    model, tok, _ = load_model("model/final_model", "cache/vocab_small.txt", dtype=pick_dtype("auto", "cpu", "decode"))
    settings = SamplingSettings(max_new_tokens=1000, top_k=8, num_samples=1, seed=int(figures.group(3)),
                                ignore_eos=True)
    again, ids = gpt2chinese_generate.generate_samples(Engine(model), tok, "[CLS]苏落妩媚一笑", settings, 1, lambda s: None)
    assert again == texts[:1] and len(ids[0]) == 1000


def cls_heavy_folder(folder: Path, tok: Tokenizer) -> Path:
    """A Hugging Face folder of a tiny GPT that very often writes [CLS] (end of text)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        # hidden dimension 0 is always 1 after the final LayerNorm, so column 0 of the tied output is a logit bias
        model.transformer.ln_f.weight[0] = 0.0
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tok.cls_id, 0] = 3.0
    gpt2_chinese_folder(model, folder)
    (folder / "vocab.txt").write_text(tok.vocab_file_text(), encoding="utf-8")
    return folder


def test_cls_is_a_paragraph_break_and_samples_come_in_batches(tmp_path, capsys, monkeypatch):
    tok = Tokenizer(gpt2chinese_vocab("".join(articles())))
    folder = cls_heavy_folder(tmp_path / "final_model", tok)
    batches = []
    stream = Engine.stream

    def recording(self, idx, *args, **kwargs):
        batches.append(idx.size(0) * kwargs.get("copies", 1))  # the rows generated together
        yield from stream(self, idx, *args, **kwargs)

    monkeypatch.setattr(Engine, "stream", recording)
    sample_py.main(["--model_path", str(folder), "--prefix", "苏落", "--length", "40", "--nsamples", "3",
                    "--batch_size", "2", "--fast_pattern", "--seed", "4", "--device", "cpu", "--save_samples",
                    f"--save_samples_path={tmp_path / 'mnt'}"])
    captured = capsys.readouterr()
    assert batches == [2, 1]
    assert FIGURES.search(captured.err).group(1) == "120"  # a [CLS] stops nothing: 3 x 40 tokens
    texts = re.findall(r"SAMPLE \d+ ={40}\n(.*?)\n={90}\n\n", (tmp_path / "mnt" / "samples.txt").read_text("utf-8"),
                       re.S)
    assert len(texts) == 3 and all(t.startswith("苏落") and "\n\n" in t for t in texts)
    assert [int(n) for n in HEADER.findall(captured.out)] == [1, 2, 3]


def test_their_token_joining():
    tokens = ["[CLS]", "苏", "落", "[CLS]", "hello", "world", "play", "##ing", "[SEP]", "[MASK]", "x", "#", "#", "2",
              "[SEP]", "#", "[SEP]"]
    joiner = gpt2chinese_generate.TextJoiner(wordpiece=True)
    shown = "".join(joiner.add(t) for t in tokens) + joiner.flush()
    # generate.py: '##' is removed from the joined text, so two '#' tokens in a row vanish too
    assert joiner.text == shown == "苏落\n\nhello world playing\nx2\n#"
    ours = gpt2chinese_generate.TextJoiner(wordpiece=False)  # our vocabulary keeps spaces as tokens: letters are not words
    assert "".join(ours.add(t) for t in ["h", "i", " ", "a"]) == ours.text == "hi a"


def test_samples_file_layout_and_the_previous_file_kept(tmp_path, capsys):
    first = gpt2chinese_generate.save_samples_file(["苏落妩媚一笑。"], str(tmp_path))
    second = gpt2chinese_generate.save_samples_file(["韩立", "银月"], str(tmp_path))
    assert first == second == str(tmp_path / "samples.txt")
    assert (tmp_path / "samples_2.txt").read_text("utf-8") == f"{'=' * 40} SAMPLE 1 {'=' * 40}\n苏落妩媚一笑。\n{'=' * 90}\n\n"
    assert (tmp_path / "samples.txt").read_text("utf-8").count("SAMPLE") == 2
    assert "samples_2.txt" in capsys.readouterr().err


# ------------------------------------------------------------------ flag mapping

def test_split_flags_both_forms_switches_and_the_rest_in_order():
    given, rest = gpt2chinese.split_flags(["--length=50", "--compile", "False", "--topp", "0.9", "--fast_pattern",
                                           "--prefix", "[CLS]苏落", "--seed=3"], gpt2chinese_generate.GENERATE_FLAGS)
    assert given == {"length": 50, "topp": 0.9, "fast_pattern": True, "prefix": "[CLS]苏落"}
    assert rest == ["--compile", "False", "--seed=3"]
    for argv, words in ((["--length", "many"], ["--length", "integer"]), (["--nsamples"], ["needs a value"]),
                        (["--fast_pattern=1"], ["takes no value"])):
        with pytest.raises(UserError) as info:
            gpt2chinese.split_flags(argv, gpt2chinese_generate.GENERATE_FLAGS)
        assert all(word in str(info.value) for word in words)


def generate_config(argv: list[str]) -> tuple[dict, gpt2chinese_generate.GenerateCommand]:
    command = gpt2chinese_generate.generate_command(argv, sample_py.DEFAULTS)
    return get_config(sample_py.DEFAULTS, command.argv, sample_py.ALIASES, types=sample_py.TYPES), command


def test_generate_flags_and_their_defaults():
    assert gpt2chinese_generate.generate_command(["--temperature", "0.7", "--out_dir", "x"], sample_py.DEFAULTS) is None
    config, command = generate_config(["--fast_pattern"])
    assert (config["num_samples"], config["top_k"], config["top_p"], config["start"], config["init_from"]) == \
        (10, 8, 1.0, "萧炎", "model/final_model")
    assert config["ignore_eos"] and config["save_samples_path"] == "." and not config["save_samples"]
    assert command.length_from_model and command.batch_size == 1
    config, command = generate_config(["--topp", "0.9", "--topk", "-1", "--length", "50", "--nsamples=4",
                                       "--batch_size", "2", "--model_config", "x.json", "--no_wordpiece",
                                       "--repetition_penalty", "1.3", "--device", "1"])
    assert (config["top_p"], config["top_k"], config["max_new_tokens"], config["num_samples"]) == (0.9, 0, 50, 4)
    assert config["repetition_penalty"] == 1.3 and config["device"] == "1"
    assert command.batch_size == 2 and not command.length_from_model
    config, _ = generate_config(["--prefix", "苏落", "--start", "韩立", "--out_dir", "out-x"])  # ours, given, win
    assert config["start"] == "韩立" and config["out_dir"] == "out-x" and config["init_from"] == ""
    config, _ = generate_config(["--model_path", "m", "--out_dir", "out-x"])  # a model path given is used
    assert config["init_from"] == "m"


@pytest.mark.slow
def test_train_flags_become_our_settings(trained, monkeypatch):
    root, result = trained
    assert result.returncode == 0, result.stderr
    monkeypatch.chdir(root)
    argv = ["--model_config", "config/model_config_small.json", "--tokenizer_path=cache/vocab_small.txt",
            "--epochs", "3", "--batch_size", "4", "--gradient_accumulation", "2", "--log_step", "20", "--lr", "2e-4",
            "--warmup_steps", "5", "--stride", "16", "--max_grad_norm", "0.5", "--output_dir", "model2/",
            "--writer_dir", "tb/", "--fp16_opt_level", "O2", "--pretrained_model", "model/final_model", "--fp16",
            "--seed=9"]
    command = gpt2chinese_train.train_command(argv, train_py.DEFAULTS, train_py.TYPES)
    config = get_config(train_py.DEFAULTS, command.argv, types=train_py.TYPES)
    meta = json.loads((root / "data" / "train" / "meta.json").read_text(encoding="utf-8"))
    assert config["max_iters"] == math.ceil(3 * meta["train_tokens"] / 16 / (4 * 2))
    assert (config["batch_size"], config["gradient_accumulation_steps"], config["log_interval"]) == (4, 2, 10)
    assert (config["learning_rate"], config["warmup_iters"], config["grad_clip"]) == (2e-4, 5, 0.5)
    assert (config["out_dir"], config["init_from"], config["seed"]) == ("model2/", "model/final_model", 9)
    assert (config["dataset"], config["data_dir"], config["n_layer"], config["block_size"]) == ("train", "data", 1, 32)
    assert command.final_model == Path("model2/final_model")
    assert config["dtype"] == ("float16" if torch.cuda.is_available() else "auto")  # --fp16 is for GPUs
    assert gpt2chinese_train.train_command(["--epochs", "2", "--batch_size", "4"], train_py.DEFAULTS, train_py.TYPES) is None
    command = gpt2chinese_train.train_command(["--model_config", "config/model_config_small.json", "--block_size", "16",
                                         "--output_dir", "model2/"], train_py.DEFAULTS, train_py.TYPES)
    assert get_config(train_py.DEFAULTS, command.argv, types=train_py.TYPES)["block_size"] == 16


def test_epochs_are_their_step_count():
    # GPT2-Chinese: total_steps = full_len / stride * epochs / batch_size / gradient_accumulation
    assert gpt2chinese_train.iterations(15, 7_650_000, 512, 8, 1) == math.ceil(7_650_000 / 512 * 15 / 8)
    assert gpt2chinese_train.iterations(1, 100, 768, 8, 1) == 1


# ------------------------------------------------------------------ refusals and errors: one line, status 2

def error_of(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("script, argv, words", [
    ("train", ["--raw", "--segment"], ["--segment", "not supported"]),
    ("train", ["--bpe_token", "--raw"], ["--bpe_token", "not supported"]),
    ("train", ["--bpe_token=1"], ["--bpe_token", "not supported"]),
    ("sample", ["--segment", "--prefix", "苏落"], ["--segment", "not supported"]),
    ("train", ["--raw", "--epochs", "x"], ["--epochs", "integer"]),
    ("train", ["--raw", "--raw_data_path", "nothing.json"], ["nothing.json", "does not exist"]),
    ("train", ["--raw_data_path", "data/other.json", "--tokenizer_path", "cache/vocab_small.txt"], ["--raw"]),
    ("train", ["--raw", "--min_length", "100000"], ["--min_length 100000"]),
    ("sample", ["--length", "-5"], ["--length", "-1"]),
    ("sample", ["--nsamples", "0"], ["--nsamples"]),
])
def test_refused_flags_and_bad_values(tmp_path, capsys, monkeypatch, script, argv, words):
    monkeypatch.chdir(make_checkout(tmp_path))
    line = error_of(train_py.main if script == "train" else sample_py.main, argv, capsys)
    assert all(word in line for word in words), line


@pytest.mark.slow
def test_vocab_size_mismatch_and_an_existing_final_model_are_refused(trained, tmp_path, capsys, monkeypatch):
    root, _ = trained
    monkeypatch.chdir(root)
    config = json.loads((root / "config" / "model_config_small.json").read_text(encoding="utf-8"))
    (tmp_path / "big.json").write_text(json.dumps(dict(config, vocab_size=13317)), encoding="utf-8")
    line = error_of(train_py.main, ["--model_config", str(tmp_path / "big.json"), "--output_dir", "model3/"], capsys)
    assert "vocab_size 13317" in line and str(config["vocab_size"]) in line
    line = error_of(train_py.main, ["--output_dir", "model/", "--epochs", "1"], capsys)
    assert "final_model already holds a model" in line and "--overwrite=True" in line
    assert not (root / "model3").exists()  # refused before any work


def test_help_lists_their_flags(capsys):
    with pytest.raises(SystemExit) as info:
        train_py.main(["--raw", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "--stride" in out and "--max_iters" in out  # theirs, then ours
    assert all(f"--{name} " in out for name in gpt2chinese_train.TRAIN_FLAGS)
    with pytest.raises(SystemExit):
        sample_py.main(["--help"])
    out = capsys.readouterr().out
    assert all(f"--{name} " in out for name in gpt2chinese_generate.GENERATE_FLAGS) and "--max_new_tokens" in out


# ------------------------------------------------------------------ fine-tuning keeps the configured dropout

@pytest.mark.slow
def test_fine_tuning_keeps_the_configured_dropout(trained, monkeypatch, tmp_path):
    root, _ = trained
    monkeypatch.chdir(root)
    folder = root / "model" / "final_model"
    config = dict(train_py.DEFAULTS, dataset="train", data_dir="data", out_dir=str(tmp_path / "ft"),
                  init_from=str(folder), block_size=32, dropout=0.25, batch_size=2, gradient_accumulation_steps=1,
                  max_iters=2, eval_iters=1, device="cpu", dtype="float32", compile=False)
    train_py.train(config)
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["dropout"] == 0.25
    model = GPT.from_state_dict(ckpt["model_args"], ckpt["model"]).train()
    ids = torch.tensor([[6, 7, 8, 9]])
    assert not torch.equal(model(ids)[0], model(ids)[0])  # dropout is on in training mode

    # GPT2-Chinese's --pretrained_model fine-tunes with the folder's own resid_pdrop
    hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    for name in os.listdir(folder):
        (pretrained / name).write_bytes((folder / name).read_bytes())
    (pretrained / "config.json").write_text(json.dumps(dict(hf, resid_pdrop=0.2)), encoding="utf-8")
    command = gpt2chinese_train.train_command(["--pretrained_model", str(pretrained), "--output_dir", str(tmp_path)],
                                       train_py.DEFAULTS, train_py.TYPES)
    assert get_config(train_py.DEFAULTS, command.argv, types=train_py.TYPES)["dropout"] == 0.2
