"""GPT2-Chinese's command lines, run here unchanged: the flag parsing its train.py and generate.py share.

train.py and sample.py call `train_command(argv, ...)` (gpt2chinese_train.py) / `generate_command(argv, ...)`
(gpt2chinese_generate.py) before parsing their own options; both return None unless argv holds a flag that only
GPT2-Chinese has. Our own --key=value options may follow theirs and win. TRAIN_FLAGS and GENERATE_FLAGS list
every flag of their scripts with what it does here.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from configurator import UserError


@dataclass(frozen=True)
class Flag:
    """One GPT2-Chinese flag: its argparse type (None: store_true), its default, and what it does here."""
    kind: type | None
    default: object
    here: str

REFUSED = {"segment": "--segment (word-level Chinese, thulac) is not supported here: train on characters with "
                      "a vocab_small.txt-style vocabulary and leave --segment out",
           "bpe_token": "--bpe_token (GPT-2 byte-pair tokens) is not supported here: train on characters with "
                        "a vocab_small.txt-style vocabulary and leave --bpe_token out"}

# ------------------------------------------------------------------ parsing their flags

def split_flags(argv: list[str], flags: dict[str, Flag]) -> tuple[dict[str, object], list[str]]:
    """Their flags in argv (`--flag value`, `--flag=value`, bare store_true flags), typed, and the rest of argv
    in order. A refused flag, a bad value or a missing value is a UserError."""
    given, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        name, has_value, raw = arg[2:].partition("=") if arg.startswith("--") else ("", False, "")
        if name not in flags:
            rest.append(arg)
            continue
        flag = flags[name]
        if name in REFUSED:
            raise UserError(REFUSED[name])
        if flag.kind is None:
            if has_value:
                raise UserError(f"--{name} takes no value (it is a switch): write --{name} alone")
            given[name] = True
            continue
        if not has_value:
            if i >= len(argv) or (argv[i].startswith("--") and len(argv[i]) > 2):
                raise UserError(f"--{name} needs a value: --{name} VALUE (GPT2-Chinese's default {flag.default!r})")
            raw, i = argv[i], i + 1
        try:
            given[name] = flag.kind(raw)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(flag.kind, "a string")
            raise UserError(f"--{name} expects {kind}, got {raw!r}") from None
    return given, rest


def has_own_flag(argv: list[str], flags: dict[str, Flag], ours: dict) -> bool:
    """Whether argv holds a flag that GPT2-Chinese's script has and ours has not."""
    names = {a[2:].partition("=")[0] for a in argv if a.startswith("--")}
    return any(name in flags and name not in ours for name in names)


def given_keys(rest: list[str]) -> set[str]:
    """The names of our own options in the rest of argv (to leave what the user set alone)."""
    return {a[2:].partition("=")[0] for a in rest if a.startswith("--")}


def wants_help(argv: list[str], script: str, flags: dict[str, Flag]) -> bool:
    """With -h or --help: list GPT2-Chinese's flags and what each does here (our own list follows)."""
    if "-h" not in argv and "--help" not in argv:
        return False
    print(f"GPT2-Chinese's {script} flags work too (--flag value or --flag=value; ours may follow and win):")
    for name, flag in flags.items():
        print(f"  --{name:<22} {flag.here}")
    print("  (a flag that ours has too, such as --device, means this only beside one that ours has not)\n")
    return True


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)
