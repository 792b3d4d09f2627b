"""GPT2-Chinese's generate.py command, run here unchanged: its flags mapped onto our sample.py's, and its
samples laid out and saved as it lays them out.

    python sample.py --length 1000 --tokenizer_path cache/vocab_small.txt --model_path model/final_model \\
        --prefix "[CLS]苏落妩媚一笑" --topp 1 --save_samples --save_samples_path ./mnt/
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from configurator import UserError
from novelgpt.engine import SamplingSettings
from novelgpt.gpt2chinese import Flag, given_keys, has_own_flag, note, split_flags, wants_help

if TYPE_CHECKING:
    from novelgpt.engine import Engine
    from novelgpt.tokenizer import Tokenizer

SAMPLE_RULE = "=" * 90  # closes a sample in samples.txt
END_RULE = "=" * 80  # generate.py's last console line
WORD_LETTERS = frozenset("qwertyuiopasdfghjklzxcvbnm")  # generate.py's is_word: lower-case Latin letters only
# How generate.py renders special tokens; any other token is written as it is (wordpieces lose their ##).
RENDERED = {"[MASK]": "", "[CLS]": "\n\n", "[SEP]": "\n"}

GENERATE_FLAGS = {
    "device": Flag(str, "0,1,2,3", "--device (a GPU index; the first of several; the CPU when it is missing)"),
    "length": Flag(int, -1, "--max_new_tokens; -1 (their default): the model's n_ctx"),
    "batch_size": Flag(int, 1, "samples generated together; nsamples are made in batches of this size"),
    "nsamples": Flag(int, 10, "--num_samples (their default 10)"),
    "temperature": Flag(float, 1.0, "--temperature"),
    "topk": Flag(int, SamplingSettings.__dataclass_fields__["top_k"].default, "--top_k (0 = off)"),
    "topp": Flag(float, 0.0, "--top_p; 0 (their default) or 1 = off"),
    "model_config": Flag(str, "config/model_config_small.json", "accepted, not needed: as in theirs, the model "
                         "folder's config.json is used"),
    "tokenizer_path": Flag(str, "cache/vocab_small.txt", "--vocab (default: the model folder's vocab.txt, else "
                           "cache/vocab_small.txt)"),
    "model_path": Flag(str, "model/final_model", "--init_from"),
    "prefix": Flag(str, "萧炎", "--start"),
    "no_wordpiece": Flag(None, False, "accepted, not needed: their generate.py does not read it either"),
    "segment": Flag(None, False, "refused: word-level Chinese is not supported"),
    "fast_pattern": Flag(None, False, "accepted, always on: we always decode with a KV cache"),
    "save_samples": Flag(None, False, "write save_samples_path/samples.txt in their layout"),
    "save_samples_path": Flag(str, ".", "--save_samples_path"),
    "repetition_penalty": Flag(float, 1.0, "--repetition_penalty (ours: a seen token's logit is divided if "
                               "positive, multiplied if negative; theirs divides, which raises a negative one)"),
}

# ------------------------------------------------------------------ generate.py

@dataclass
class GenerateCommand:
    """A GPT2-Chinese generate.py command, translated: our argv, and how to batch and lay out its samples."""
    argv: list[str]
    batch_size: int
    length_from_model: bool  # --length -1: the model's n_ctx


def generate_command(argv: list[str], defaults: dict) -> GenerateCommand | None:
    """None when argv holds no GPT2-Chinese-only generate.py flag; otherwise our argv for their command, with
    their defaults (10 samples of n_ctx tokens, --prefix 萧炎, model/final_model) where nothing says otherwise."""
    if wants_help(argv, "generate.py", GENERATE_FLAGS):
        return GenerateCommand(["--help"], 1, False)  # our own list follows
    if not has_own_flag(argv, GENERATE_FLAGS, defaults):
        return None
    given, rest = split_flags(argv, GENERATE_FLAGS)
    ours = given_keys(rest)
    value = {name: given.get(name, flag.default) for name, flag in GENERATE_FLAGS.items()}
    if value["batch_size"] < 1 or value["nsamples"] < 1:
        raise UserError(f"--nsamples and --batch_size must be at least 1, got {value['nsamples']} and "
                        f"{value['batch_size']}")
    if value["length"] == 0 or value["length"] < -1:
        raise UserError(f"--length must be a number of tokens, or -1 for the model's n_ctx; got {value['length']}")
    out = [f"--num_samples={value['nsamples']}", f"--temperature={value['temperature']}",
           f"--top_k={max(0, value['topk'])}", f"--top_p={value['topp'] if 0 < value['topp'] < 1 else 1.0}",
           f"--repetition_penalty={value['repetition_penalty']}", f"--save_samples_path={value['save_samples_path']}",
           "--ignore_eos=True"]  # their [CLS] is a paragraph break, never the end
    if value["length"] > 0:
        out.append(f"--max_new_tokens={value['length']}")
    if not ours & {"start"}:
        out.append(f"--start={value['prefix']}")
    if "model_path" in given or not ours & {"init_from", "out_dir"}:  # our --init_from, given after, wins
        out.append(f"--init_from={value['model_path']}")
    if not ours & {"vocab"}:
        out.append(f"--vocab={generate_vocab(given, value['model_path'])}")
    for name in ("device", "save_samples"):
        if name in given:
            out.append(f"--{name}={given[name]}")
    return GenerateCommand(out + rest, value["batch_size"], value["length"] == -1)


def generate_vocab(given: dict, model_path: str) -> str:
    """--tokenizer_path; else '' (the model folder's vocab.txt) unless the folder has none and their default exists."""
    if "tokenizer_path" in given:
        return given["tokenizer_path"]
    default = GENERATE_FLAGS["tokenizer_path"].default
    if os.path.isdir(model_path) and not os.path.isfile(os.path.join(model_path, "vocab.txt")) \
            and os.path.isfile(default):
        return default
    return ""


def is_word(token: str) -> bool:
    """generate.py's test for an English word token: lower-case Latin letters only."""
    return all(c in WORD_LETTERS for c in token)


class TextJoiner:
    """Token strings joined as generate.py joins them: a space between two English word tokens, [MASK] empty,
    [CLS] a paragraph break, [SEP] a line break, then every '##' removed and the whole stripped. `add` returns
    the piece to show now and `flush` the rest at the end: what they show adds up to `text` exactly."""

    def __init__(self, wordpiece: bool):
        self.wordpiece = wordpiece  # English spacing only for a BERT vocabulary: ours keeps spaces as tokens
        self.parts: list[str] = []
        self.previous = ""
        self.shown = ""
        self.hashes = ""  # a trailing run of '#': with the next token's it may make a '##' to remove
        self.held = ""  # whitespace not shown yet: it is dropped if the text ends or has not begun

    def add(self, token: str) -> str:
        spaced = self.wordpiece and bool(self.parts) and is_word(self.previous) and is_word(token)
        rendered = (" " if spaced else "") + RENDERED.get(token, token)
        self.parts.append(rendered)
        self.previous = token
        raw = self.hashes + rendered
        head = raw.rstrip("#")
        self.hashes = raw[len(head):]
        return self._show(head.replace("##", ""))

    def flush(self) -> str:
        """The end of the text: a last run of '#' (whitespace after it is stripped, as theirs)."""
        piece, self.hashes = self.hashes.replace("##", ""), ""
        return self._show(piece)

    def _show(self, piece: str) -> str:
        piece = self.held + piece
        if not self.shown:
            piece = piece.lstrip()
        visible = piece.rstrip()
        self.held = piece[len(visible):]
        self.shown += visible
        return visible

    @property
    def text(self) -> str:
        return "".join(self.parts).replace("##", "").strip()


def header(n: int) -> str:
    """The line that opens sample n in generate.py's output."""
    return f"{'=' * 40} SAMPLE {n} {'=' * 40}"


def samples_file_text(texts: list[str], first: int = 1) -> str:
    """Samples in the layout of generate.py's samples.txt: header line, text, a rule of 90 '=', a blank line."""
    return "".join(f"{header(n)}\n{text}\n{SAMPLE_RULE}\n\n" for n, text in enumerate(texts, first))


def save_samples_file(texts: list[str], folder: str) -> str:
    """Write folder/samples.txt as generate.py does; a samples.txt already there is kept as samples_<n>.txt."""
    from novelgpt.files import atomic_write_bytes

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "samples.txt")
    if os.path.exists(path):
        n = 2
        while os.path.exists(os.path.join(folder, f"samples_{n}.txt")):
            n += 1
        os.replace(path, os.path.join(folder, f"samples_{n}.txt"))
        note(f"the previous {path} is now samples_{n}.txt")
    atomic_write_bytes(Path(path), samples_file_text(texts).encode("utf-8"))
    return path


def stream_batch(engine: Engine, tok: Tokenizer, prompt_ids: list[int], settings: SamplingSettings, rows: int) -> Iterator[tuple[int, int]]:
    """(row, token id) for each new token of `rows` continuations of prompt_ids, generated as one batch."""
    for step in engine.stream_settings(tok, prompt_ids, settings, rows, stop_ids=()):  # theirs runs to --length
        for row, token in enumerate(step.tolist()):  # one transfer per step
            yield row, token


def generate_samples(engine: Engine, tok: Tokenizer, prompt: str, settings: SamplingSettings, batch_size: int,
                     write: Callable[[str], None]) -> tuple[list[str], list[list[int]]]:
    """settings.num_samples samples in batches of batch_size, shown as generate.py prints them (the first of
    each batch streamed). Returns the texts (prompt included, as theirs) and each sample's new token ids."""
    from dataclasses import replace

    prompt_ids = tok.encode(prompt).tolist()
    if not prompt_ids:
        raise UserError('empty --prefix; give some text, or "[CLS]" to begin a new text')
    wordpiece = tok.wordpiece
    texts, new_ids = [], []
    for first in range(0, settings.num_samples, batch_size):
        rows = min(batch_size, settings.num_samples - first)
        seed = None if settings.seed is None else settings.seed + first
        joiners = [TextJoiner(wordpiece) for _ in range(rows)]
        write(f"{header(first + 1)}\n\n")
        for joiner in joiners:
            for token in prompt_ids:
                joiner.add(tok.itos[token])
        write(joiners[0].shown)
        ids = [[] for _ in range(rows)]
        for row, token in stream_batch(engine, tok, prompt_ids, replace(settings, seed=seed), rows):
            ids[row].append(token)
            piece = joiners[row].add(tok.itos[token])
            if row == 0:
                write(piece)
        write(joiners[0].flush() + "\n")
        for n, joiner in enumerate(joiners[1:], first + 2):
            write(f"{header(n)}\n\n{joiner.text}\n")
        texts += [joiner.text for joiner in joiners]
        new_ids += ids
    write(END_RULE + "\n")
    return texts, new_ids
