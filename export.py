"""Export a model as a Hugging Face GPT-2 folder that other tools read.

    python export.py out-mynovel exported/                  # a run folder (its ckpt.pt), a .pt file or a HF folder
    python export.py out-mynovel/ckpt.pt exported/ --format=bin   # pytorch_model.bin only (GPT2-Chinese)

The folder holds config.json (real bos/eos/pad ids), generation_config.json, model.safetensors and/or
pytorch_model.bin, vocab.txt, tokenizer_config.json and special_tokens_map.json, plus tokenizer.json for our
character vocabulary. transformers' GPT2LMHeadModel / AutoTokenizer / pipeline("text-generation") load it,
and so does GPT2-Chinese's generate.py (--model_path exported --tokenizer_path exported/vocab.txt).
The work is done by hf.py; this file is the command line.
"""
from __future__ import annotations

import sys

from novelgpt.checkpoint import load_model, resolve_source
from configurator import Options, UserError, exit_with_error, get_config, print_options
from novelgpt.files import check_path_names
from novelgpt.hf import FORMATS, export_folder

DEFAULTS = Options(
    format=("both", "both (model.safetensors and pytorch_model.bin), bin or safetensors"),
    vocab=("", "the vocab.txt of a source folder that has none"),
)
USAGE = "usage: python export.py <out_dir, ckpt.pt or model folder> <new folder> [--format=both|bin|safetensors]"


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the bare arguments, the options with their values): every option here takes a value."""
    bare, options, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            options.append(arg)
            if "=" not in arg and arg not in ("-h", "--help") and i + 1 < len(argv):
                options.append(argv[i + 1])
                i += 1
        else:
            bare.append(arg)
        i += 1
    return bare, options


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(f"{__doc__.strip()}\n\n{USAGE}")
        print_options(DEFAULTS)
        return
    try:
        bare, options = split_arguments(argv)
        config = get_config(DEFAULTS, options)
        if len(bare) != 2:
            raise UserError(f"give a model and a new folder ({len(bare)} given); {USAGE}")
        if config["format"] not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {config['format']!r}")
        source, target = bare
        check_path_names(target, "the new folder")
        model, tok, _ = load_model(resolve_source(source), config["vocab"])
        try:
            names = export_folder(model, tok, target, config["format"])
        except (OSError, ValueError) as e:
            raise UserError(f"cannot export to {target}: {e}") from None
    except UserError as e:
        exit_with_error(e)
    except KeyboardInterrupt:  # the folder is written beside the target and swapped in whole: nothing half-written
        print("\ninterrupted; the target folder is as it was", file=sys.stderr)
        raise SystemExit(130)
    print(f"wrote {target}: {', '.join(names)}")
    print("note: the export is the GPT-2 alone; transformers has no place for the novel's memory (sample.py "
          f"--init_from={target} --dataset=<its dataset> mixes it back in)")
    print(f"load it with transformers: GPT2LMHeadModel.from_pretrained({target!r}), "
          f"AutoTokenizer.from_pretrained({target!r})")


if __name__ == "__main__":
    main()
