"""Settings for the scripts: defaults, then config files, then command-line overrides.

    python train.py config/novel_cpu.py --batch_size=8 --compile False
    python sample.py --start "苏落妩媚一笑" --num_samples 3 --save_samples

`get_config(defaults)` returns a new dict. Positional arguments are config files (plain Python,
UTF-8), applied in order; then `--key=value` / `--key value` overrides, applied in order; a bare
`--flag` sets a bool key to True (booleans take only True/true/False/false). Values are Python
literals, falling back to the raw string, and must match the type of the default, or the type
declared in `types=` for a key whose default is None ("auto"). `--help` lists every key.

Convention for scripts: every mistake a user can fix raises UserError (a ValueError with a one-line
message); main() catches it and calls `exit_with_error(e)`, which prints "error: ..." to stderr
and exits with status 2 (the same status argparse uses for usage errors).
"""

import ast
import difflib
import math
import os
import sys
import traceback
from types import ModuleType
from typing import NoReturn

MAX_CONFIG_BYTES = 1 << 20  # a config file is a few settings; anything larger is not one
BOOL_WORDS = {"True": True, "true": True, "False": False, "false": False}


class UserError(ValueError):
    """A mistake the user can fix (bad option, bad file, missing data); the message is one line for them."""


ConfigError = UserError  # the name the scripts used before UserError covered every one-line error


def exit_with_error(message: object) -> NoReturn:
    """Print a one-line error for the user and exit with status 2 (text the terminal cannot show is escaped)."""
    text = f"error: {message}"
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding, "replace"), file=sys.stderr)
    raise SystemExit(2)


def check_text(text: str, what: str) -> str:
    """Refuse text that is not valid Unicode: bytes that were not UTF-8 (Python keeps them as lone surrogates)."""
    for position, char in enumerate(text):
        if "\ud800" <= char <= "\udfff":
            byte = f"byte 0x{ord(char) - 0xDC00:02x}" if ord(char) >= 0xDC80 else "a lone surrogate"
            raise UserError(f"{what} is not valid UTF-8 text ({byte} at character {position + 1}); "
                            "give it in UTF-8 (check the terminal's or the file's encoding)")
    return text


def _unknown(name: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join('--' + k for k in close)}?" if close else ""
    return ConfigError(f"{where}unknown option '{name}'{hint} (see --help for the list)")


def _type_name(kind: type) -> str:
    return {bool: "True or False", int: "an integer", float: "a number", str: "a string"}.get(kind, kind.__name__)


def _checked(key: str, value: object, default: object, declared: type | None = None, where: str = "") -> object:
    """Return value if it fits the key's type (that of its default, or `declared` for a None default, which
    then also admits None); an int is accepted as a float. Raise ConfigError otherwise."""
    kind = type(default) if default is not None else declared
    if kind is None:
        raise TypeError(f"option {key} defaults to None: declare its type in get_config(types=...)")
    if default is None and value is None:
        return value
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            value = float(value) if ok else value
        except OverflowError:  # an int too large for a float
            value = math.inf
    else:
        ok = isinstance(value, kind)
    if not ok:
        also = " (or None for auto)" if default is None else ""
        raise ConfigError(f"{where}--{key} expects {_type_name(kind)}{also}, got {value!r}"[:300])
    # every number, whatever the key: NaN, infinity and integers past 64 bits reach no sensible setting, only a
    # traceback deep inside (each script checks its own keys' ranges too)
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where}--{key} expects a finite number, got {value}")
    if kind is int and not -2**63 <= value < 2**63:
        raise ConfigError(f"{where}--{key} is out of range: a {value.bit_length()}-bit integer, past the 64 bits "
                          "any setting fits in")
    if kind is str:
        check_text(value, f"{where}--{key}")
    return value


def _parse(key: str, raw: str, default: object, declared: type | None) -> object:
    """Turn a command-line string into a value for key; a str key keeps the text as typed."""
    kind = type(default) if default is not None else declared
    if kind is str and not (default is None and raw == "None"):
        return check_text(raw, f"--{key}")
    if kind is bool and raw in BOOL_WORDS:
        return BOOL_WORDS[raw]
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = raw
    return _checked(key, value, default, declared)


def _read_config_file(path: str, defaults: dict, types: dict[str, type]) -> dict:
    """Run a config file in a fresh namespace and return the settings it makes."""
    try:
        if not os.path.isfile(path) and os.path.exists(path):
            raise ConfigError(f"config file {path} is not a regular file; give a .py file")
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is {os.path.getsize(path):,} bytes; a config is a short .py file")
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path} as UTF-8 text: {e}") from None
    namespace = {"__file__": path, "__name__": "__config__"}
    try:
        exec(compile(source, path, "exec"), namespace)
    except Exception as e:
        # the line in the config file itself, whether the error is a SyntaxError or raised at run time
        lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__) if frame.filename == path]
        line = getattr(e, "lineno", None) if isinstance(e, SyntaxError) else (lines[-1] if lines else "?")
        raise ConfigError(f"{path}, line {line}: {type(e).__name__}: {e}") from None
    settings = {}
    for name, value in namespace.items():
        if name.startswith("_") or isinstance(value, ModuleType):
            continue
        if name not in defaults:
            raise _unknown(name, list(defaults), f"{path}: ")
        settings[name] = _checked(name, value, defaults[name], types.get(name), f"{path}: ")
    return settings


class Options(dict):
    """A script's settings, written as key=(default, "one-line explanation"): a dict of the defaults whose
    explanations --help prints beside them, so a key's meaning is written once, where it is defined."""

    def __init__(self, **spec: tuple[object, str]):
        super().__init__((key, default) for key, (default, _) in spec.items())
        self.explanations = {key: text for key, (_, text) in spec.items()}

    def with_more(self, **spec: tuple[object, str]) -> "Options":
        """These options and more (a subcommand's own)."""
        return Options(**{key: (default, self.explanations[key]) for key, default in self.items()}, **spec)


def _print_help(defaults: dict, aliases: dict[str, str], positional: str | None = None) -> None:
    main_doc = (getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip()
    if main_doc:
        print(main_doc.splitlines()[0] + "\n")
    first = f"[{positional}]" if positional else "[config.py ...]"
    print(f"usage: python {os.path.basename(sys.argv[0])} {first} [--key=value | --key value | --flag ...]\n")
    print_options(defaults, aliases)


def print_options(defaults: dict, aliases: dict[str, str] | None = None) -> None:
    """--help's list: each key with its default and, for Options, its explanation; then the aliases."""
    print("options (default):")
    width = max((len(k) for k in defaults), default=0) + 2
    explanations = getattr(defaults, "explanations", {})
    shown = {key: repr(default) for key, default in defaults.items()}
    value_width = min(max((len(v) for v in shown.values()), default=0), 16)  # a long default pushes only its line
    for key, value in shown.items():
        print(f"  --{key:<{width}} {value:<{value_width}}  {explanations.get(key, '')}".rstrip())
    if aliases:
        print("\naliases:")
        for alias, key in aliases.items():
            print(f"  --{alias:<{width}} same as --{key}")


def get_config(defaults: dict, argv: list[str] | None = None, aliases: dict[str, str] | None = None,
               types: dict[str, type] | None = None, positional: str | None = None) -> dict:
    """Return a copy of defaults updated by the config files and --key=value options in argv.

    types declares the type of each key whose default is None (None then means "auto"). With
    `positional`, a bare argument is that key's value (prepare.py's input file) instead of a config file."""
    argv = sys.argv[1:] if argv is None else list(argv)
    aliases, types = dict(aliases or {}), dict(types or {})
    for key, default in defaults.items():
        if default is None and key not in types:
            raise TypeError(f"option {key} defaults to None: declare its type in get_config(types=...)")
    valid = list(defaults) + list(aliases)
    files, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            _print_help(defaults, aliases, positional)
            raise SystemExit(0)
        if not arg.startswith("--"):
            if arg.startswith("-") and len(arg) > 1:
                raise ConfigError(f"unknown option '{arg}'; options look like --key=value (see --help)")
            if positional is None:
                files.append(arg)
            elif any(key == positional for key, _ in overrides):
                raise ConfigError(f"one {positional} only, got a second: '{arg}'")
            else:
                overrides.append((positional, arg))
            continue
        name, has_value, raw = arg[2:].partition("=")
        key = aliases.get(name, name)
        if key not in defaults:
            raise _unknown(name, valid, "")
        if not has_value:
            next_arg = argv[i] if i < len(argv) else None
            if isinstance(defaults[key], bool) or types.get(key) is bool:
                # a bool key takes the next word only if it is one; otherwise it is a bare flag
                raw = "True"
                if next_arg in BOOL_WORDS:
                    raw, i = next_arg, i + 1
            elif next_arg is None or next_arg.startswith("--"):
                raise ConfigError(f"--{name} needs a value: --{name}=VALUE or --{name} VALUE "
                                  f"(default {defaults[key]!r})")
            else:
                raw, i = next_arg, i + 1
        overrides.append((key, raw))
    config = dict(defaults)
    for path in files:
        config.update(_read_config_file(path, defaults, types))
    for key, raw in overrides:
        config[key] = _parse(key, raw, defaults[key], types.get(key))
    return config
