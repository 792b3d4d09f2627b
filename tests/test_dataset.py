"""dataset.open_dataset and Dataset on datasets prepared in tmp_path."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from novelgpt import preparing
from configurator import UserError
from novelgpt.dataset import Dataset, load_meta, open_dataset, vocab_size_of
from novelgpt.files import FolderLock

TEXT = "".join(f"第{k}回。宝玉笑道：“好妹妹，你又来了。”黛玉冷笑道：“我哪里敢？”\n" for k in range(200))


def make(tmp_path: Path, name: str = "n", **options) -> Path:
    (tmp_path / "n.txt").write_text(TEXT, encoding="utf-8")
    preparing.prepare(str(tmp_path / "n.txt"), name, data_dir=str(tmp_path / "data"), block_size=32, **options)
    return tmp_path / "data" / name


def one_line_error(call) -> str:
    with pytest.raises(UserError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_open_and_batches_draw_as_train_did(tmp_path):
    folder = make(tmp_path)
    data = open_dataset(str(tmp_path / "data"), "n", block_size=32)
    assert isinstance(data, Dataset) and data.folder == folder
    assert data.tokenizer.itos == json.loads((folder / "meta.json").read_text(encoding="utf-8"))["itos"]
    train = data.tokens("train")
    assert isinstance(train, np.memmap) and len(train) == data.meta["train_tokens"] and train.dtype == np.uint16
    x, y = data.get_batch("train", 5, 32, torch.Generator().manual_seed(7), "cpu")
    assert x.shape == y.shape == (5, 32) and x.dtype == y.dtype == torch.int64
    # the same random draw as train.py's get_batch had, so training results do not change
    starts = torch.randint(len(train) - 32, (5,), generator=torch.Generator().manual_seed(7)).tolist()
    expected = np.stack([train[i:i + 33] for i in starts]).astype(np.int64)
    assert x.tolist() == expected[:, :-1].tolist() and y.tolist() == expected[:, 1:].tolist()
    with pytest.raises(ValueError):
        data.tokens("test")


def test_fingerprint_follows_the_files(tmp_path):
    make(tmp_path, vocab_size=200)
    first = open_dataset(str(tmp_path / "data"), "n")
    before = first.fingerprint()
    assert open_dataset(str(tmp_path / "data"), "n").fingerprint() == before
    make(tmp_path, vocab_size=300)  # prepared again: the same token counts, another vocabulary
    again = open_dataset(str(tmp_path / "data"), "n")
    assert again.meta["train_tokens"] == first.meta["train_tokens"] and again.meta["vocab_size"] == 300
    prepared_again = again.fingerprint()
    assert first.fingerprint() == prepared_again != before  # it reads the folder as it is now
    with open(again.folder / "train.bin", "ab") as f:
        f.write(b"\0\0")
    assert again.fingerprint() not in (before, prepared_again)
    (again.folder / "meta.json").unlink()
    assert again.fingerprint() == "missing"


def test_damaged_datasets_are_refused_in_one_line(tmp_path):
    folder = make(tmp_path)
    data_dir = str(tmp_path / "data")
    meta_bytes = (folder / "meta.json").read_bytes()
    for damage, message in [(meta_bytes[:len(meta_bytes) // 2], "meta.json is damaged"),
                            (b"\xff\xfe garbage", "meta.json is damaged"),
                            (json.dumps({"train_tokens": 5}).encode(), "meta.json is damaged"),
                            (meta_bytes.replace(b'"uint16"', b'"float64"'), "not uint16 or uint32")]:
        (folder / "meta.json").write_bytes(damage)
        assert message in one_line_error(lambda: open_dataset(data_dir, "n"))
        assert "python prepare.py yourfile.txt --dataset n" in one_line_error(lambda: open_dataset(data_dir, "n"))
    (folder / "meta.json").write_bytes(meta_bytes)
    val = (folder / "val.bin").read_bytes()
    (folder / "val.bin").write_bytes(val[:len(val) // 2])  # a truncated val.bin
    assert "val.bin has" in one_line_error(lambda: open_dataset(data_dir, "n"))
    (folder / "val.bin").unlink()
    assert "cannot read" in one_line_error(lambda: open_dataset(data_dir, "n"))
    (folder / "val.bin").write_bytes(val)
    meta = open_dataset(data_dir, "n").meta
    message = one_line_error(lambda: open_dataset(data_dir, "n", block_size=meta["val_tokens"]))
    assert "val.bin has" in message and "smaller --block_size" in message
    assert "python prepare.py yourfile.txt --dataset other" in one_line_error(lambda: open_dataset(data_dir, "other"))
    for name in ("..", "../n", "", "."):
        assert "--dataset" in one_line_error(lambda: open_dataset(data_dir, name))


def test_readers_share_and_keep_writers_out(tmp_path):
    make(tmp_path)
    data = open_dataset(str(tmp_path / "data"), "n")
    with FolderLock(data.folder, "training", shared=True), FolderLock(data.folder, "training", shared=True):
        message = one_line_error(lambda: make(tmp_path, vocab_size=99))
        assert f"in use by training (PID {os.getpid()})" in message
    assert data.fingerprint() == open_dataset(str(tmp_path / "data"), "n").fingerprint()
    make(tmp_path, vocab_size=99)
    assert open_dataset(str(tmp_path / "data"), "n").meta["vocab_size"] == 99


def test_opening_never_prepares_not_even_the_default_corpus(tmp_path):
    message = one_line_error(lambda: open_dataset(str(tmp_path / "data"), "hongloumeng"))
    assert message == f"no dataset at {tmp_path / 'data' / 'hongloumeng'}; make it with: python prepare.py"
    assert not (tmp_path / "data").exists()
    assert vocab_size_of(tmp_path / "data" / "hongloumeng") == 13317  # the default where nothing is prepared
    make(tmp_path, vocab_size=300)
    assert vocab_size_of(tmp_path / "data" / "n") == len(load_meta(tmp_path / "data" / "n")["itos"]) == 300
