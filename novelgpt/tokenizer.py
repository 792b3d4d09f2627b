"""Character-level tokenizer shared by prepare.py, train.py and sample.py.

A token is one of the five special tokens written literally ("[CLS]") or a single character.
The vocabulary is either built from a corpus (specials, newline, corpus characters by falling
frequency, then common Chinese and punctuation) or read from a GPT2-Chinese/BERT vocab file.
Encoding is vectorized: code points go through a numpy lookup table, no Python loop per character.

A BERT vocabulary (GPT2-Chinese's vocab_small.txt, uer's 21,128 tokens: it has no newline token) is
encoded as GPT2-Chinese encodes its training data: BERT's basic tokenizer (whitespace dropped,
lowercased, accents stripped, Chinese characters and punctuation alone) and wordpieces for the rest,
with a newline as [SEP]. Every document is wrapped in doc_start ... doc_end ([MASK] ... [CLS] as in
GPT2-Chinese); the fingerprint is a hash of the token list, stored with the vocabulary.
"""
from __future__ import annotations

import hashlib
import json
import re
import string
import unicodedata
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
DOC_START, DOC_END = "[MASK]", "[CLS]"  # GPT2-Chinese's document wrapping (its train.py)
# BERT's basic tokenizer: these code points are Chinese characters, each a token of its own.
CHINESE_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                  (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
# What BERT's basic tokenizer does with a character: deletes it (control characters: the text around
# joins up), splits there (whitespace), keeps it as a token of its own, or makes it part of a word.
REMOVE, DROP, ALONE, WORD = 0, 1, 2, 3
MAX_WORD_CHARS = 100  # BERT's wordpiece turns a longer word into one [UNK]


def vocab_fingerprint(itos: list[str]) -> str:
    """A short hash of the token list: two vocabularies with the same fingerprint give every id the same token."""
    return hashlib.sha256(json.dumps(itos, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def bert_class(ch: str) -> int:
    """REMOVE (control), DROP (whitespace), ALONE (Chinese character, punctuation) or WORD, as BERT does."""
    cp, category = ord(ch), unicodedata.category(ch)
    if ch in " \t\n\r" or category == "Zs":
        return DROP
    if cp in (0, 0xFFFD) or category.startswith("C"):
        return REMOVE
    if any(lo <= cp <= hi for lo, hi in CHINESE_RANGES):
        return ALONE
    # BERT counts every non-alphanumeric ASCII character as punctuation, $ + < = > ^ ` | ~ included
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or category.startswith("P"):
        return ALONE
    return WORD


def bert_normalize(text: str) -> str:
    """Lowercase, then strip accents (NFD without combining marks), as BERT's uncased tokenizer."""
    return "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")


def common_characters(gb2312_level_2: bool = True) -> list[str]:
    """Characters everyday Chinese prompts use, most useful first: ASCII, punctuation, GB2312 (without its
    3,008 rarer level-2 hanzi when not gb2312_level_2), Big5's frequently used hanzi."""
    chars = list(string.printable[:95])  # digits, letters, punctuation, space
    chars += list("，。、；：？！“”‘’（）《》〈〉【】「」『』…—～·")
    chars += [chr(c) for c in range(0x3000, 0x3040)]  # CJK symbols and punctuation
    chars += [chr(c) for c in range(0xFF01, 0xFF5F)]  # full-width forms
    # GB2312 hanzi: rows 16-55 are level 1 (3,755 most frequent), rows 56-87 level 2 (3,008).
    for row in range(0xB0, 0xF8 if gb2312_level_2 else 0xD8):
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

    def __init__(self, itos: list[str], doc_start: str = DOC_START, doc_end: str = DOC_END,
                 hf_metadata: dict | None = None):
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
        self.wordpiece = "\n" not in self.stoi  # a BERT vocabulary: encode as GPT2-Chinese does
        for token in (doc_start, doc_end):
            if token not in self.stoi:
                raise ValueError(f"document marker {token} is not in the vocabulary")
        self.doc_start, self.doc_end = doc_start, doc_end
        self.bos_id, self.eos_id = self.stoi[doc_start], self.stoi[doc_end]
        self.hf_metadata = dict(hf_metadata or {})  # what a Hugging Face folder said about it (tokenizer_class)
        self.fingerprint = vocab_fingerprint(self.itos)
        self._lookup = self._build_lookup()
        self._pieces: dict[str, list[int]] = {}  # wordpiece results by word
        self._bert_class: np.ndarray | None = None  # BERT tables by code point, made on first use

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
        tok = cls(meta["itos"], meta.get("doc_start", DOC_START), meta.get("doc_end", DOC_END),
                  meta.get("hf_metadata"))
        if meta.get("fingerprint", tok.fingerprint) != tok.fingerprint:
            raise ValueError("the vocabulary does not match its fingerprint: the file is damaged")
        return tok

    def to_meta(self) -> dict:
        meta = {"tokenizer_version": TOKENIZER_VERSION, "itos": self.itos, "fingerprint": self.fingerprint,
                "special_ids": {t: self.stoi[t] for t in SPECIAL_TOKENS if t in self.stoi},
                "newline_id": self.newline_id, "doc_start": self.doc_start, "doc_end": self.doc_end}
        if self.hf_metadata:
            meta["hf_metadata"] = self.hf_metadata
        return meta

    def with_settings(self, doc_start: str | None = None, doc_end: str | None = None,
                      hf_metadata: dict | None = None) -> "Tokenizer":
        """The same vocabulary with other document markers or Hugging Face metadata (None: keep)."""
        return Tokenizer(self.itos, doc_start or self.doc_start, doc_end or self.doc_end,
                         self.hf_metadata if hf_metadata is None else hf_metadata)

    def encode(self, text: str) -> np.ndarray:
        """Text to an int64 array of ids; characters outside the vocabulary become [UNK]."""
        if self.wordpiece:
            text = text.replace("\n", "[SEP]")  # GPT2-Chinese's train.py: a newline is [SEP]
        parts = SPECIAL_PATTERN.split(text)  # odd positions are the special tokens themselves
        pieces = []
        for k, part in enumerate(parts):
            if k % 2:
                pieces.append(np.array([self.stoi.get(part, self.unk_id)], dtype=np.int64))
            elif part and self.wordpiece:
                pieces.append(self._encode_bert(part))
            elif part:
                code_points = np.frombuffer(part.encode("utf-32-le"), dtype=np.uint32)
                pieces.append(self._lookup[code_points].astype(np.int64))
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

    def _word_ids(self, word: str) -> list[int]:
        """BERT's greedy longest-match wordpieces of one normalized word; [UNK] alone if any part is missing."""
        if word not in self._pieces:
            ids, start = [], 0
            while start < len(word) and len(word) <= MAX_WORD_CHARS:
                end = len(word)
                while end > start and (word[start:end] if start == 0 else "##" + word[start:end]) not in self.stoi:
                    end -= 1
                if end == start:
                    break
                ids.append(self.stoi[word[start:end] if start == 0 else "##" + word[start:end]])
                start = end
            self._pieces[word] = ids if start == len(word) else [self.unk_id]
        return self._pieces[word]

    def _learn_code_points(self, code_points: np.ndarray) -> None:
        """Fill the BERT tables for code points not seen yet: their class and, standing alone, their ids."""
        for cp in np.unique(code_points[self._bert_class[code_points] < 0]).tolist():
            ch = chr(cp)
            self._bert_class[cp] = bert_class(ch)
            if self._bert_class[cp] == ALONE:
                self._alone_ids[cp] = self._word_ids(bert_normalize(ch))
                self._bert_single[cp] = self._alone_ids[cp][0] if len(self._alone_ids[cp]) == 1 else -1

    def _encode_bert(self, text: str) -> np.ndarray:
        """One span without special tokens, as BERT's tokenizer: vectorized for the characters that stand alone
        (Chinese, punctuation), a Python loop only over the runs of other characters (Latin words, digits)."""
        if self._bert_class is None:  # made on first use: a character vocabulary never needs them
            self._bert_class = np.full(MAX_CODE_POINT, -1, dtype=np.int8)
            self._bert_single = np.full(MAX_CODE_POINT, -1, dtype=np.int64)
            self._alone_ids: dict[int, list[int]] = {}
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        self._learn_code_points(code_points)
        if (self._bert_class[code_points] == REMOVE).any():  # BERT deletes control characters before splitting
            code_points = code_points[self._bert_class[code_points] != REMOVE]
            text = code_points.tobytes().decode("utf-32-le")
        cls = self._bert_class[code_points]  # (N,) what happens to each character
        is_word = cls == WORD
        previous_word = np.concatenate(([False], is_word[:-1]))
        next_word = np.concatenate((is_word[1:], [False]))
        run_ends = iter((np.flatnonzero(is_word & ~next_word) + 1).tolist())
        starts = np.flatnonzero((cls == ALONE) | (is_word & ~previous_word))  # (S,) where each segment begins
        single = self._bert_single[code_points[starts]]  # (S,) the id of one alone character, else -1
        simple = ~is_word[starts] & (single >= 0)
        segments = []  # (segment, ids) of the others: word runs, and alone characters with 0 or 2+ ids
        counts = np.ones(len(starts), dtype=np.int64)
        for k in np.flatnonzero(~simple).tolist():
            start = int(starts[k])
            ids = self._word_ids(bert_normalize(text[start:next(run_ends)])) if is_word[start] else \
                self._alone_ids[int(code_points[start])]
            segments.append((k, ids))
            counts[k] = len(ids)
        offsets = np.concatenate(([0], np.cumsum(counts)))  # (S + 1,) where each segment's ids go
        out = np.empty(int(offsets[-1]), dtype=np.int64)
        out[offsets[:-1][simple]] = single[simple]
        for k, ids in segments:
            out[offsets[k]:offsets[k + 1]] = ids
        return out

    def unknown_chars(self, text: str) -> Counter:
        """Characters of `text` that would be encoded as [UNK] (with a BERT vocabulary: standing alone)."""
        plain = SPECIAL_PATTERN.sub("", text)
        code_points = np.frombuffer(plain.encode("utf-32-le"), dtype=np.uint32)
        if self.wordpiece:
            values, counts = np.unique(code_points, return_counts=True)
            return Counter({chr(v): int(n) for v, n in zip(values.tolist(), counts.tolist())
                            if bert_class(chr(v)) > DROP and self._word_ids(bert_normalize(chr(v))) == [self.unk_id]})
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
