"""Copy check: which stretches of a generated text appear verbatim in the training text (train.bin).

    index = load_copy_index("data/hongloumeng")          # built once, cached as data/<name>/cache-copyindex-*.npz
    copies = find_copies(tok.encode(text), index)        # spans of >= 12 tokens found in the training text
    print(copy_summary(text, tok, index))                # one line: the longest copied span and the copied share

    python evaluate.py --dataset=hongloumeng --copies=FILE:samples/samples.txt   # the same from the command line

The index holds a 64-bit hash of every GRAM-token window of train.bin, sorted, and where each window
starts. A window of the text whose hash is in the index is then compared with train.bin itself at each
place it occurs, so the spans found are exact: a hash collision can cost time, never a false span.
"""
from __future__ import annotations

import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from configurator import UserError
from novelgpt.dataset import load_meta
from novelgpt.tokenizer import Tokenizer

GRAM = 8  # window length of the index; the shortest min_copy it can answer
DEFAULT_MIN_COPY = 12  # characters; shorter shared stretches are everyday phrases, not copying
INDEX_VERSION = 1
MAX_PLACES = 1024  # a window seen more often is compared at its first MAX_PLACES places only
CACHE_PREFIX = "cache-copyindex"  # data/<name>/cache-* is reserved for files derived from the dataset
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd, so each step of the polynomial hash is a bijection


@dataclass(frozen=True)
class CopyIndex:
    """The training tokens of one dataset and a sorted table of their GRAM-token window hashes."""
    train: np.ndarray  # (N,) token ids of train.bin, memory-mapped
    hashes: np.ndarray  # (N - GRAM + 1,) uint64, sorted
    starts: np.ndarray  # (N - GRAM + 1,) where in train each hash's window begins, in hash order
    folder: Path


@dataclass(frozen=True)
class Copies:
    """Where a text repeats the training text: maximal verbatim spans (they may overlap) as [start, end)."""
    spans: list[tuple[int, int]]  # token positions; for our character tokenizer, character positions too
    longest: tuple[int, int] | None  # the longest span
    copied: int  # tokens that lie in at least one span
    total: int  # tokens checked

    @property
    def share(self) -> float:
        return self.copied / self.total if self.total else 0.0


def window_hashes(ids: np.ndarray, gram: int = GRAM) -> np.ndarray:
    """(len(ids) - gram + 1,) uint64 polynomial hashes of every gram-token window, vectorized."""
    ids = np.asarray(ids)
    n = len(ids) - gram + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    values = ids.astype(np.uint64) + np.uint64(1)  # + 1: a window of zeros must not hash to 0
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):  # the hash works modulo 2**64 on purpose
        for j in range(gram):
            h = h * _MULTIPLIER + values[j:j + n]
    return h ^ (h >> np.uint64(29))  # mix the high bits into the low ones, which the sort looks at first


def build_index(train: np.ndarray, folder: Path = Path(".")) -> CopyIndex:
    """Hash and sort every GRAM-token window of train (a few hundred ms for 3 million tokens)."""
    hashes = window_hashes(train)
    order = np.argsort(hashes, kind="stable").astype(np.uint32 if len(train) < 2**32 else np.uint64)
    return CopyIndex(train, hashes[order], order, folder)


def _dataset_tokens(folder: Path) -> np.ndarray:
    """train.bin of a prepared dataset folder, memory-mapped with the dtype its meta.json names."""
    try:
        meta = load_meta(folder)
        return np.memmap(folder / "train.bin", dtype=np.dtype(meta.get("dtype", "uint16")), mode="r")
    except FileNotFoundError as e:
        raise UserError(f"{folder} is not a prepared dataset ({Path(e.filename).name} is missing); "
                        "run prepare.py for it") from None
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot read the dataset in {folder}: {e}") from None


def cache_path(folder: Path) -> Path:
    return folder / f"{CACHE_PREFIX}-g{GRAM}.npz"


def load_copy_index(folder: str | Path) -> CopyIndex:
    """The index of the dataset in folder: read from its cache, or built and cached (written atomically).
    The cache is rebuilt when train.bin's size or modification time differs from those it recorded."""
    folder = Path(folder)
    train = _dataset_tokens(folder)
    stat = os.stat(folder / "train.bin")
    stamp = np.array([INDEX_VERSION, GRAM, stat.st_size, stat.st_mtime_ns], dtype=np.int64)
    path = cache_path(folder)
    try:
        with np.load(path, allow_pickle=False) as cached:
            hashes, starts = cached["hashes"], cached["starts"]
            windows = max(0, len(train) - GRAM + 1)
            # a damaged cache with a right stamp must not reach the search, where a wrong start is an IndexError
            whole = (hashes.shape == starts.shape == (windows,) and np.issubdtype(starts.dtype, np.integer)
                     and (windows == 0 or int(starts.max()) < windows))
            if np.array_equal(cached["stamp"], stamp) and whole:
                return CopyIndex(train, hashes, starts, folder)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # none yet, or a damaged one: build it again
        pass
    index = build_index(train, folder)
    tmp = folder / f"{CACHE_PREFIX}.{os.getpid()}.tmp.npz"
    try:
        np.savez(tmp, stamp=stamp, hashes=index.hashes, starts=index.starts)
        os.replace(tmp, path)
    except OSError as e:  # a read-only dataset still gets its copy check, only without the cache
        print(f"note: cannot cache the copy index in {folder} ({e.strerror}); it is built at each start",
              file=sys.stderr)
    finally:
        if tmp.exists():
            tmp.unlink()
    return index


def _longest_match(ids: np.ndarray, i: int, train: np.ndarray, places: np.ndarray) -> int:
    """The longest common prefix of ids[i:] and train[p:] over p in places, compared in chunks."""
    length, limit, n = 0, len(ids) - i, len(train)
    alive = places.astype(np.int64)
    while alive.size and length < limit:
        step = min(64, limit - length)
        where = alive[:, None] + length + np.arange(step)  # (places, step) positions in train
        window = np.where(where < n, train[np.minimum(where, n - 1)], -1)
        equal = window == ids[i + length:i + length + step]  # (places, step)
        run = np.where(equal.all(axis=1), step, equal.argmin(axis=1))  # tokens matched in this chunk
        best = int(run.max())
        length += best
        if best < step:
            break
        alive = alive[run == step]
    return length


def match_lengths(ids: np.ndarray, index: CopyIndex) -> np.ndarray:
    """(len(ids),) the longest match of each suffix of ids in the training text where it is >= GRAM, else 0."""
    ids = np.asarray(ids, dtype=np.int64)
    lengths = np.zeros(len(ids), dtype=np.int64)
    hashes = window_hashes(ids)
    first = np.searchsorted(index.hashes, hashes, side="left")
    last = np.searchsorted(index.hashes, hashes, side="right")
    for i in np.flatnonzero(last > first).tolist():
        places = index.starts[first[i]:min(last[i], first[i] + MAX_PLACES)]
        found = _longest_match(ids, i, index.train, places)
        lengths[i] = found if found >= GRAM else 0  # below GRAM only through a hash collision
    return lengths


def find_copies(ids: np.ndarray, index: CopyIndex, min_copy: int = DEFAULT_MIN_COPY) -> Copies:
    """The maximal spans of at least min_copy tokens of ids that appear verbatim in the training text."""
    if min_copy < GRAM:
        raise UserError(f"min_copy must be at least {GRAM} (the index's window), got {min_copy}")
    lengths = match_lengths(ids, index)
    spans = []
    for i, length in enumerate(lengths.tolist()):
        # a match starting one token later that ends at the same place is inside the previous one
        if length >= min_copy and (i == 0 or length > lengths[i - 1] - 1):
            spans.append((i, i + length))
    covered = np.zeros(len(lengths) + 1, dtype=np.int64)
    for start, end in spans:
        covered[start] += 1
        covered[end] -= 1
    copied = int((np.cumsum(covered)[:-1] > 0).sum())
    longest = max(spans, key=lambda s: s[1] - s[0]) if spans else None
    return Copies(spans, longest, copied, len(lengths))


def copy_summary(text: str, tok: Tokenizer, index: CopyIndex, min_copy: int = DEFAULT_MIN_COPY) -> str:
    """One line on a generated text (give the continuation, not the prompt): the longest span found
    verbatim in the training text and the share of the text in such spans."""
    ids = tok.encode(text)
    copies = find_copies(ids, index, min_copy)
    if copies.longest is None:
        return f"copy check: no span of {min_copy}+ characters is in the training text"
    start, end = copies.longest
    quoted = tok.decode(ids[start:end]).replace("\n", "⏎")
    if len(quoted) > 40:
        quoted = quoted[:18] + "……" + quoted[-18:]
    return (f"copy check: longest copied span {end - start} characters 「{quoted}」; "
            f"{copies.share:.0%} of the text lies in copied spans of {min_copy}+ characters")


def trained_dataset(metadata: dict) -> Path | None:
    """The dataset folder a checkpoint was trained on, from its metadata's config (checkpoint.load_model); None
    if it names none, as a Hugging Face / GPT2-Chinese folder does not."""
    config = metadata.get("config") or {}
    if not config.get("dataset"):
        return None
    return Path(config.get("data_dir") or "data") / str(config["dataset"])


def copy_index_for(metadata: dict, source: str | Path, tok: Tokenizer) -> tuple[CopyIndex | None, str]:
    """The copy index of the training text of the checkpoint read from source (its metadata), and a line saying
    what is checked (or why nothing is). The index is built and cached on first use."""
    folder = trained_dataset(metadata)
    if folder is None:
        return None, f"copy check off: {source} does not name the dataset it was trained on"
    try:
        meta = load_meta(folder)
    except (OSError, ValueError):
        return None, f"copy check off: the training data, {folder}, is not here (run from the folder you trained in)"
    if meta.get("itos") != tok.itos:
        return None, f"copy check off: {folder} was prepared again with another vocabulary since training"
    try:
        index = load_copy_index(folder)
    except UserError as e:
        return None, f"copy check off: {e}"
    return index, f"copy check against {folder}/train.bin ({len(index.train):,} tokens)"
