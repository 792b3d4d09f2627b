"""Turn a novel into train.bin / val.bin token files plus meta.json and vocab.txt under data/<name>/.

    python prepare.py                          # the built-in default: 红楼梦 (Zhiyanzhai edition)
    python prepare.py mynovel.txt --dataset mynovel    # (--name, the old spelling, works too)
    python prepare.py input.json --dataset mynovel --vocab cache/vocab_small.txt
    python prepare.py big5novel.txt --encoding=big5

Input: a .txt file (UTF-8, UTF-16, GB18030/GBK or Big5, detected unless --encoding names one), a
GPT2-Chinese .json (a list of strings, a list of {"text": ...} objects, or JSON Lines), or a folder of
.txt files. The work is done by novelgpt/preparing.py; this file is the command line.
"""
from __future__ import annotations

import sys
from pathlib import Path

from configurator import Options, UserError, exit_with_error, get_config
from novelgpt.preparing import prepare
from novelgpt.tokenizer import DEFAULT_VOCAB_SIZE

MAX_VOCAB_SIZE = 2**32  # ids are written as uint32 at most
DEFAULTS = Options(
    source=("", "a .txt/.json file or a folder of .txt files (a bare argument); empty: the default corpus"),
    dataset=("", "dataset name: the output goes to data_dir/<dataset>/ (default: the input's file name)"),
    vocab=("", "a GPT2-Chinese/BERT vocab file, or a model folder (its vocab.txt), instead of building one"),
    vocab_size=(DEFAULT_VOCAB_SIZE, "size of a built vocabulary"),
    val_fraction=(0.1, "last part of each document for validation"),
    block_size=(512, "context length the data must hold"),
    data_dir=("data", "parent folder of the datasets"),
    encoding=("auto", "the input's text encoding: auto (detected), or a Python codec name such as big5"),
    errors=("strict", "replace: go on past bytes that do not decode (each becomes U+FFFD) instead of stopping"),
)


def report(meta: dict, out: Path) -> None:
    """The summary lines a user reads after preparing."""
    print(f"{meta['documents']} document(s), {meta['characters']:,} characters, vocabulary {meta['vocab_size']:,}")
    print(f"train: {meta['train_tokens']:,} tokens, val: {meta['val_tokens']:,} tokens ({meta['dtype']})")
    if meta["unk_tokens"]:
        shown = meta["unk_chars"][:50]
        print(f"[UNK]: {meta['unk_tokens']:,} tokens from {len(meta['unk_chars'])} characters outside the "
              f"vocabulary: {shown}{' ...' if len(meta['unk_chars']) > 50 else ''}")
    else:
        print("[UNK]: 0 (every character is in the vocabulary)")
    print(f"wrote {out}/train.bin, val.bin, meta.json, vocab.txt")


def main(argv: list[str] | None = None) -> None:
    try:
        config = get_config(DEFAULTS, argv, aliases=dict(name="dataset"), positional="source")
        if not 0 < config["vocab_size"] <= MAX_VOCAB_SIZE or not 0 < config["block_size"] < 2**31:
            raise UserError(f"--vocab_size must be in 6..{MAX_VOCAB_SIZE:,} (token ids are stored as uint32) and "
                            f"--block_size in 1..2**31-1; got {config['vocab_size']} and {config['block_size']}")
        settings = {key: value for key, value in config.items() if key != "dataset"}
        meta = prepare(name=config["dataset"], **settings)
    except UserError as e:
        exit_with_error(e)
    except MemoryError:
        exit_with_error(f"out of memory preparing {config['source'] or 'the default corpus'}: prepare a smaller "
                        "part of it (split the text into a smaller file)")
    except KeyboardInterrupt:  # the dataset folder is replaced only whole: nothing half-written stays
        print("\ninterrupted; the dataset folder is as it was", file=sys.stderr)
        raise SystemExit(130)
    report(meta, Path(config["data_dir"]) / meta["name"])


if __name__ == "__main__":
    main()
