"""copycheck.py on a dataset prepared here: planted spans are found exactly, new text gives nothing, the
result matches a brute-force search, the cache is written once and rebuilt when train.bin changes."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from novelgpt.checkpoint import checkpoint_state, load_model
from configurator import UserError
from novelgpt.copycheck import (CACHE_PREFIX, GRAM, build_index, cache_path, copy_index_for, copy_summary, find_copies,
                       load_copy_index)
from model import GPT, GPTConfig
from novelgpt.preparing import prepare
from novelgpt.tokenizer import Tokenizer

SUBJECTS = ["宝玉", "黛玉", "凤姐", "袭人", "老太太", "贾母", "探春", "湘云", "平儿", "晴雯"]
VERBS = ["笑道", "听了", "忙问", "叹道", "点头", "走来", "坐下", "回头看", "拉着手说", "红了脸"]
TAILS = ["“你这会子又来做什么？”", "“妹妹身上可大好了？”", "便往园子里去了。", "只是不言语。", "一面吃茶，一面说话。",
         "众人都笑了。", "心中暗想，不知如何是好。", "“明日再来罢。”", "忙起身让坐。", "因问：“今儿可好些？”"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Tokenizer, np.ndarray]:
    """A novel-like text of about 12,000 characters (sentences drawn at random), prepared as prepare.py does."""
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(600):
        lines.append("".join(f"{rng.choice(SUBJECTS)}{rng.choice(VERBS)}{rng.choice(TAILS)}" for _ in range(2)))
    root = tmp_path_factory.mktemp("copy")
    (root / "novel.txt").write_text("\n".join(lines), encoding="utf-8")
    prepare(str(root / "novel.txt"), name="novel", vocab_size=300, block_size=32, data_dir=str(root / "data"))
    folder = root / "data" / "novel"
    tok = Tokenizer.from_meta(json.loads((folder / "meta.json").read_text(encoding="utf-8")))
    return folder, tok, np.fromfile(folder / "train.bin", dtype=np.uint16).astype(np.int64)


def brute_force_spans(ids: np.ndarray, train: np.ndarray, min_copy: int) -> list[tuple[int, int]]:
    """Maximal spans of >= min_copy tokens of ids that occur in train, by plain string search."""
    text = "".join(chr(0x4E00 + int(t)) for t in train)  # one character per token: substring search is exact
    sample = "".join(chr(0x4E00 + int(t)) for t in ids)
    spans = []
    for i in range(len(sample)):
        end = i
        while end < len(sample) and sample[i:end + 1] in text:
            end += 1
        if end - i >= min_copy and not (spans and spans[-1][1] >= end):
            spans.append((i, end))
    return spans


def test_a_planted_span_is_found_exactly(dataset):
    folder, tok, train = dataset
    index = load_copy_index(folder)
    planted = tok.decode(train[5000:5030])
    before, after = "今天天气很好，我们去公园散步吧。", "然后大家一起回家吃晚饭了。"
    text = before + planted + after
    copies = find_copies(tok.encode(text), index)
    start = len(before)
    assert copies.longest is not None and copies.longest[0] <= start and copies.longest[1] >= start + 30
    assert copies.longest[1] - copies.longest[0] < 30 + 6  # at most a character or two of the frame coincide
    assert copies.copied == copies.longest[1] - copies.longest[0] and copies.total == len(text)


def test_text_that_is_not_in_the_training_text_gives_nothing(dataset):
    folder, tok, _ = dataset
    index = load_copy_index(folder)
    new = "春江潮水连海平，海上明月共潮生。滟滟随波千万里，何处春江无月明。" * 3
    copies = find_copies(tok.encode(new), index)
    assert copies.spans == [] and copies.longest is None and copies.share == 0.0
    assert copy_summary(new, tok, index) == "copy check: no span of 12+ characters is in the training text"


def test_matches_a_brute_force_search(dataset):
    folder, tok, train = dataset
    index = load_copy_index(folder)
    rng = np.random.default_rng(1)
    for trial in range(20):
        parts = []
        for _ in range(6):  # training slices of 3-40 tokens glued to random tokens
            start, length = rng.integers(0, len(train) - 40), rng.integers(3, 40)
            parts += [train[start:start + length], rng.integers(6, tok.vocab_size, rng.integers(0, 4))]
        ids = np.concatenate(parts)
        for min_copy in (GRAM, 12, 20):
            copies = find_copies(ids, index, min_copy)
            assert copies.spans == brute_force_spans(ids, train, min_copy), (trial, min_copy)
            covered = np.zeros(len(ids), bool)
            for s, e in copies.spans:
                covered[s:e] = True
            assert copies.copied == covered.sum()


def test_summary_names_the_longest_span_and_the_share(dataset):
    folder, tok, train = dataset
    index = load_copy_index(folder)
    copied = tok.decode(train[800:820])
    text = copied + "春江潮水连海平，海上明月共潮生。滟滟随波千万里"
    copies = find_copies(tok.encode(text), index)
    length = copies.longest[1] - copies.longest[0]
    assert copy_summary(text, tok, index) == (
        f"copy check: longest copied span {length} characters 「{tok.decode(train[800:800 + length])}」; "
        f"{copies.share:.0%} of the text lies in copied spans of 12+ characters")
    with pytest.raises(UserError, match=f"min_copy must be at least {GRAM}"):
        find_copies(tok.encode(text), index, min_copy=GRAM - 1)


def test_the_cache_is_written_once_and_rebuilt_when_train_bin_changes(dataset, tmp_path: Path):
    folder, tok, train = dataset
    copy = tmp_path / "novel"
    copy.mkdir()
    for name in ("train.bin", "meta.json"):
        (copy / name).write_bytes((folder / name).read_bytes())
    first = load_copy_index(copy)
    assert [p.name for p in copy.iterdir() if p.name.startswith(CACHE_PREFIX)] == [cache_path(copy).name]
    assert not [p for p in copy.iterdir() if "tmp" in p.name]
    written = cache_path(copy).stat().st_mtime_ns
    again = load_copy_index(copy)
    assert cache_path(copy).stat().st_mtime_ns == written  # read, not rebuilt
    assert np.array_equal(again.hashes, first.hashes) and np.array_equal(again.starts, first.starts)
    # a new train.bin (prepared again): the old index would point at the wrong places
    changed = np.asarray(train[::-1], dtype=np.uint16)
    changed.tofile(copy / "train.bin")
    os.utime(copy / "train.bin", ns=(written + 10**9, written + 10**9))
    rebuilt = load_copy_index(copy)
    assert np.array_equal(rebuilt.hashes, build_index(changed).hashes)
    reversed_span = tok.decode(changed[100:130])
    assert find_copies(tok.encode(reversed_span), rebuilt).longest == (0, 30)


def test_a_broken_dataset_is_a_one_line_error(tmp_path: Path):
    with pytest.raises(UserError, match="is not a prepared dataset \\(meta.json is missing\\); run prepare.py"):
        load_copy_index(tmp_path)


def test_the_index_of_a_3_million_token_novel_is_sorted_and_whole(tmp_path: Path):
    """Its build time is bench-worthy, not a test: a timed assert failed whenever the 2 cores were busy."""
    rng = np.random.default_rng(0)
    train = rng.zipf(1.3, 3_000_000).clip(6, 13316).astype(np.uint16)  # character frequencies are Zipf-like
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16"}), encoding="utf-8")
    train.tofile(tmp_path / "train.bin")
    index = load_copy_index(tmp_path)  # hash, sort and write the cache
    assert len(index.hashes) == 3_000_000 - GRAM + 1 and np.all(np.diff(index.hashes.astype(np.uint64)) >= 0)


def test_the_checkpoint_names_its_dataset(dataset, tmp_path: Path):
    folder, tok, train = dataset
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8))
    config = {"dataset": folder.name, "data_dir": str(folder.parent)}
    torch.save(checkpoint_state(model, tok, config, 0, 9.9), tmp_path / "ckpt.pt")
    metadata = load_model(str(tmp_path / "ckpt.pt")).metadata
    index, note = copy_index_for(metadata, tmp_path / "ckpt.pt", tok)
    assert index is not None and note == f"copy check against {folder}/train.bin ({len(train):,} tokens)"
    other = Tokenizer(tok.itos[:-1] + ["龘"])
    assert copy_index_for(metadata, tmp_path / "ckpt.pt", other) == (
        None, f"copy check off: {folder} was prepared again with another vocabulary since training")
    torch.save(checkpoint_state(model, tok, {"dataset": "gone", "data_dir": str(tmp_path)}, 0, 9.9),
               tmp_path / "moved.pt")
    moved = load_model(str(tmp_path / "moved.pt")).metadata
    assert copy_index_for(moved, tmp_path / "moved.pt", tok)[1].startswith(
        f"copy check off: the training data, {tmp_path / 'gone'}, is not here")
    assert copy_index_for({}, tmp_path, tok)[0] is None  # a Hugging Face folder records no dataset
