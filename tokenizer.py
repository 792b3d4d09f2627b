"""Character-level tokenizer shared by prepare.py, train.py and sample.py.

A token is one of the five special tokens written literally ("[CLS]") or a single character.
The vocabulary is either built from a corpus (specials, newline, corpus characters by falling
frequency, then common Chinese and punctuation) or read from a GPT2-Chinese/BERT vocab file.
Encoding is vectorized: code points go through a numpy lookup table, no Python loop per character.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from pathlib import Path

import numpy as np

TOKENIZER_VERSION = 1
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# The tokenizer's definition: a special token written literally, else any single character.
TOKEN_PATTERN = re.compile(r"\[(?:PAD|UNK|CLS|SEP|MASK)\]|.", re.S)
SPECIAL_PATTERN = re.compile(r"(\[(?:PAD|UNK|CLS|SEP|MASK)\])")
# How special tokens read back as text, as GPT2-Chinese's generate.py renders them.
SPECIAL_TEXT = {"[PAD]": "", "[MASK]": "", "[SEP]": "\n", "[CLS]": "\n\n"}
NEWLINE_LINE = "\\n"  # how the newline token is written in a vocab file (a line can't hold "\n")
MAX_CODE_POINT = 0x110000
DEFAULT_VOCAB_SIZE = 13317  # GPT2-Chinese vocab_small.txt's size, and the size of a vocabulary we build


def common_characters() -> list[str]:
    """Characters everyday Chinese prompts use, most useful first: ASCII, punctuation, GB2312, Big5."""
    chars = list(string.printable[:95])  # digits, letters, punctuation, space
    chars += list("，。、；：？！“”‘’（）《》〈〉【】「」『』…—～·")
    chars += [chr(c) for c in range(0x3000, 0x3040)]  # CJK symbols and punctuation
    chars += [chr(c) for c in range(0xFF01, 0xFF5F)]  # full-width forms
    # GB2312 hanzi: rows 16-55 are level 1 (3,755 most frequent), rows 56-87 level 2 (3,008).
    for row in range(0xB0, 0xF8):
        for col in range(0xA1, 0xFF):
            try:
                chars.append(bytes([row, col]).decode("gb2312"))
            except UnicodeDecodeError:
                pass
    # Big5 frequently used hanzi (0xA440-0xC67E), the common traditional characters.
    for lead in range(0xA4, 0xC7):
        for trail in list(range(0x40, 0x7F)) + list(range(0xA1, 0xFF)):
            if (lead, trail) > (0xC6, 0x7E):
                break
            try:
                chars.append(bytes([lead, trail]).decode("big5"))
            except UnicodeDecodeError:
                pass
    return list(dict.fromkeys(chars))


class Tokenizer:
    """Maps text to ids and back; `itos[i]` is the token with id i."""

    def __init__(self, itos: list[str]):
        missing = [t for t in ("[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in itos]
        if missing:
            raise ValueError(f"vocabulary lacks {', '.join(missing)}; a vocab file needs the BERT special tokens")
        self.itos = list(itos)
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            dup = [t for t, n in Counter(self.itos).items() if n > 1][:5]
            raise ValueError(f"vocabulary has duplicate tokens: {dup}")
        self.pad_id = self.stoi.get("[PAD]", self.stoi["[UNK]"])
        self.unk_id = self.stoi["[UNK]"]
        self.cls_id = self.stoi["[CLS]"]
        self.sep_id = self.stoi["[SEP]"]
        self.mask_id = self.stoi["[MASK]"]
        # GPT2-Chinese vocabularies have no newline; it becomes [SEP] there, as in its train.py.
        self.newline_id = self.stoi.get("\n", self.sep_id)
        self._lookup = self._build_lookup()

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @property
    def dtype(self) -> str:
        """Smallest numpy dtype that holds every id."""
        return "uint16" if self.vocab_size <= 65536 else "uint32"

    def _build_lookup(self) -> np.ndarray:
        lookup = np.full(MAX_CODE_POINT, self.unk_id, dtype=np.int32)
        singles = [(t, i) for i, t in enumerate(self.itos) if len(t) == 1]
        for t, i in singles:
            lookup[ord(t)] = i
        lookup[ord("\n")] = self.newline_id
        # BERT vocabularies are lowercase: an upper-case letter falls back to its lower-case form.
        for t, i in singles:
            upper = t.upper()
            if len(upper) == 1 and upper not in self.stoi:
                lookup[ord(upper)] = i
        return lookup

    @classmethod
    def build(cls, counts: Counter, vocab_size: int = 13317) -> "Tokenizer":
        """Build a vocabulary of exactly `vocab_size` tokens from character counts of a corpus."""
        if vocab_size < len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"vocab_size {vocab_size} is too small: it needs at least "
                             f"{len(SPECIAL_TOKENS) + 1} (the 5 special tokens and newline)")
        itos = list(SPECIAL_TOKENS) + ["\n"]
        seen = set(itos)
        # Falling frequency; ties by code point so the same corpus always gives the same ids.
        corpus_chars = sorted((c for c in counts if c not in seen and len(c) == 1), key=lambda c: (-counts[c], c))
        fillers = (c for c in common_characters() + [chr(c) for c in range(0x4E00, 0xA000)] if c not in counts)
        for ch in corpus_chars:
            if len(itos) == vocab_size:
                break
            itos.append(ch)
            seen.add(ch)
        for ch in fillers:
            if len(itos) == vocab_size:
                break
            if ch not in seen:
                itos.append(ch)
                seen.add(ch)
        return cls(itos)

    @classmethod
    def from_vocab_file(cls, path: str | Path) -> "Tokenizer":
        """Read a one-token-per-line vocabulary (GPT2-Chinese's vocab_small.txt, or ours)."""
        text = Path(path).read_text(encoding="utf-8-sig")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        itos = [line[:-1] if line.endswith("\r") and len(line) > 1 else line for line in lines]
        itos = ["\n" if t == NEWLINE_LINE else t for t in itos]
        return cls(itos)

    def vocab_file_text(self) -> str:
        """The vocabulary one token per line, in the format `from_vocab_file` reads."""
        return "\n".join(NEWLINE_LINE if t == "\n" else t for t in self.itos) + "\n"

    @classmethod
    def from_meta(cls, meta: dict) -> "Tokenizer":
        """Rebuild from the dict of `to_meta` (as stored in meta.json and checkpoints)."""
        if meta.get("tokenizer_version") != TOKENIZER_VERSION:
            raise ValueError(f"tokenizer version {meta.get('tokenizer_version')} is not {TOKENIZER_VERSION}; "
                             "run prepare.py again")
        return cls(meta["itos"])

    def to_meta(self) -> dict:
        return {"tokenizer_version": TOKENIZER_VERSION, "itos": self.itos,
                "special_ids": {t: self.stoi[t] for t in SPECIAL_TOKENS if t in self.stoi},
                "newline_id": self.newline_id}

    def encode(self, text: str) -> np.ndarray:
        """Text to an int64 array of ids; characters outside the vocabulary become [UNK]."""
        parts = SPECIAL_PATTERN.split(text)  # odd positions are the special tokens themselves
        pieces = []
        for k, part in enumerate(parts):
            if k % 2:
                pieces.append(np.array([self.stoi.get(part, self.unk_id)], dtype=np.int64))
            elif part:
                code_points = np.frombuffer(part.encode("utf-32-le"), dtype=np.uint32)
                pieces.append(self._lookup[code_points].astype(np.int64))
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

    def unknown_chars(self, text: str) -> Counter:
        """Characters of `text` that would be encoded as [UNK]."""
        plain = SPECIAL_PATTERN.sub("", text)
        code_points = np.frombuffer(plain.encode("utf-32-le"), dtype=np.uint32)
        unknown = code_points[self._lookup[code_points] == self.unk_id]
        values, counts = np.unique(unknown, return_counts=True)
        return Counter({chr(v): int(n) for v, n in zip(values, counts)})

    def decode(self, ids, raw: bool = False) -> str:
        """Ids to text; special tokens read as GPT2-Chinese renders them unless `raw`."""
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            token = self.itos[i]
            if not raw and token in SPECIAL_TEXT:
                token = SPECIAL_TEXT[token]
            elif token.startswith("##"):
                token = token[2:]
            out.append(token)
        return "".join(out)
