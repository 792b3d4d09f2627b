"""GPT2-Chinese's command lines, run here unchanged: its train.py and generate.py flags mapped onto ours.

    python train.py --model_config config/model_config_small.json --tokenizer_path cache/vocab_small.txt \\
        --raw_data_path data/train.json --epochs 15 --stride 512 --output_dir model/ --raw
    python sample.py --length 1000 --tokenizer_path cache/vocab_small.txt --model_path model/final_model \\
        --prefix "[CLS]苏落妩媚一笑" --topp 1 --save_samples --save_samples_path ./mnt/

train.py and sample.py call `train_command(argv, ...)` / `generate_command(argv, ...)` before parsing their own
options; both return None unless argv holds a flag that only GPT2-Chinese has. Our own --key=value options
may follow theirs and win. TRAIN_FLAGS and GENERATE_FLAGS list every flag of their scripts with what it does here.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from configurator import UserError, get_config
from dataset import load_meta
from engine import SamplingSettings
from hf import check_export_target

if TYPE_CHECKING:
    from engine import Engine
    from tokenizer import Tokenizer

SAMPLE_RULE = "=" * 90  # closes a sample in samples.txt
END_RULE = "=" * 80  # generate.py's last console line
WORD_LETTERS = frozenset("qwertyuiopasdfghjklzxcvbnm")  # generate.py's is_word: lower-case Latin letters only
# How generate.py renders special tokens; any other token is written as it is (wordpieces lose their ##).
RENDERED = {"[MASK]": "", "[CLS]": "\n\n", "[SEP]": "\n"}


@dataclass(frozen=True)
class Flag:
    """One GPT2-Chinese flag: its argparse type (None: store_true), its default, and what it does here."""
    kind: type | None
    default: object
    here: str


TRAIN_FLAGS = {
    "device": Flag(str, "0,1,2,3", "--device (a GPU index; several: one process per GPU with torchrun, the "
                                   "command is printed)"),
    "model_config": Flag(str, "config/model_config_small.json", "n_layer, n_head, n_embd, block_size (n_ctx) and "
                         "dropout (resid_pdrop) from the JSON; its vocab_size must equal the vocabulary's"),
    "tokenizer_path": Flag(str, "cache/vocab_small.txt", "the vocabulary --raw prepares the data with (prepare.py "
                           "--vocab)"),
    "raw_data_path": Flag(str, "data/train.json", "the corpus: a JSON list of articles; its prepared dataset is "
                          "data/<file name>/"),
    "tokenized_data_path": Flag(str, "data/tokenized/", "accepted, not needed: the dataset folder holds the tokens"),
    "raw": Flag(None, False, "prepare --raw_data_path with --tokenizer_path into data/<file name>/ first"),
    "epochs": Flag(int, 5, "--max_iters = epochs x train tokens / stride / (batch_size x gradient_accumulation), "
                   "their step count"),
    "batch_size": Flag(int, 8, "--batch_size"),
    "lr": Flag(float, 1.5e-4, "--learning_rate (AdamW's peak rate; with our default Muon it is the rate of "
               "embeddings, biases and LayerNorm: add --optimizer=adamw for AdamW everywhere)"),
    "warmup_steps": Flag(int, 2000, "--warmup_iters"),
    "log_step": Flag(int, 1, "--log_interval = log_step / gradient_accumulation (theirs counts micro-batches)"),
    "stride": Flag(int, 768, "sets the epoch length: an epoch is train tokens / stride windows, as theirs; our "
                   "loader takes windows of block_size at random starts instead of every stride tokens"),
    "gradient_accumulation": Flag(int, 1, "--gradient_accumulation_steps"),
    "fp16": Flag(None, False, "--dtype=float16 with a gradient scaler on a GPU (no apex); ignored on a CPU"),
    "fp16_opt_level": Flag(str, "O1", "accepted, not needed: torch autocast is apex's O1"),
    "max_grad_norm": Flag(float, 1.0, "--grad_clip"),
    "num_pieces": Flag(int, 100, "accepted, not needed: the tokens are one memory-mapped file"),
    "min_length": Flag(int, 128, "articles of at most min_length characters are left out, as theirs"),
    "output_dir": Flag(str, "model/", "--out_dir; output_dir/final_model/ is the exported best model"),
    "pretrained_model": Flag(str, "", "--init_from (fine-tune that folder; its vocabulary must be the data's)"),
    "writer_dir": Flag(str, "tensorboard_summary/", "accepted, not needed: the curves are out_dir/metrics.jsonl and "
                       "loss.png (--wandb_log=True for wandb)"),
    "segment": Flag(None, False, "refused: word-level Chinese is not supported"),
    "bpe_token": Flag(None, False, "refused: BPE tokens are not supported"),
    "encoder_json": Flag(str, "tokenizations/encoder.json", "accepted, not needed (only --bpe_token reads it)"),
    "vocab_bpe": Flag(str, "tokenizations/vocab.bpe", "accepted, not needed (only --bpe_token reads it)"),
}
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


# ------------------------------------------------------------------ train.py

@dataclass
class TrainCommand:
    """A GPT2-Chinese train.py command, translated: our argv, and what to do after training."""
    argv: list[str]  # for train.py's get_config
    final_model: Path  # output_dir/final_model: the exported model, written after training

    def export(self, out_dir: str) -> Path:
        """After training: out_dir's best checkpoint as a Hugging Face folder in output_dir/final_model."""
        return export_final_model(out_dir, self.final_model)


def read_model_config(path: str) -> dict:
    """Our model settings from GPT2-Chinese's model_config JSON (a transformers GPT2Config)."""
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--model_config {path} does not exist; give GPT2-Chinese's model_config_small.json") from None
    except (OSError, ValueError) as e:
        raise UserError(f"--model_config {path} is not a JSON file: {str(e).splitlines()[0]}") from None
    if not isinstance(hf, dict):
        raise UserError(f"--model_config {path} is not a JSON object")
    shape = dict(n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=hf.get("n_embd", 768),
                 block_size=hf.get("n_ctx", hf.get("n_positions", 1024)), vocab_size=hf.get("vocab_size"),
                 dropout=hf.get("resid_pdrop", 0.1))
    if not all(isinstance(shape[k], int) and shape[k] > 0 for k in ("n_layer", "n_head", "n_embd", "block_size")):
        raise UserError(f"--model_config {path}: n_layer, n_head, n_embd and n_ctx must be positive integers")
    if hf.get("n_positions", shape["block_size"]) < shape["block_size"]:
        raise UserError(f"--model_config {path}: n_ctx {shape['block_size']} is above n_positions "
                        f"{hf['n_positions']}")
    return shape


def folder_dropout(folder: str, default: float) -> float:
    """The resid_pdrop of a Hugging Face folder's config.json (what GPT2-Chinese fine-tunes with)."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            value = json.load(f).get("resid_pdrop", default)
    except (OSError, ValueError, AttributeError):
        return default  # train.py says what is wrong with the folder when it loads it
    return value if isinstance(value, (int, float)) and 0 <= value < 1 else default


def dataset_location(raw_data_path: str) -> tuple[str, str]:
    """(data_dir, name) of the dataset prepared from raw_data_path: data/<its file name without extension>."""
    name = Path(raw_data_path).stem
    if not name or name.startswith("."):
        raise UserError(f"--raw_data_path {raw_data_path!r} needs a file name such as data/train.json")
    return "data", name


def article_filter(min_length: int) -> Callable[[str], bool]:
    """GPT2-Chinese's build_files keeps an article when it has more than min_length characters, counting a
    newline as ' [SEP] ' (7 characters), as its train.py measures it."""
    return lambda text: len(text) + 6 * text.count("\n") > min_length


def prepare_raw(raw_data_path: str, vocab: str, block_size: int, min_length: int) -> dict:
    """Prepare their train.json as a dataset (preparing.py's prepare with their vocabulary); returns its meta."""
    from preparing import prepare, read_documents

    if not Path(raw_data_path).is_file():
        raise UserError(f"--raw_data_path {raw_data_path} does not exist; give the train.json to prepare")
    keep = article_filter(min_length)
    articles = read_documents(Path(raw_data_path))[0]
    kept = sum(map(keep, articles))
    if not kept:
        raise UserError(f"no article of {raw_data_path} is longer than --min_length {min_length} characters; "
                        "give a smaller --min_length")
    if kept < len(articles):
        note(f"--min_length {min_length}: {len(articles) - kept} of {len(articles)} article(s) are that short or "
             "shorter and left out, as GPT2-Chinese does")
    data_dir, name = dataset_location(raw_data_path)
    meta = prepare(raw_data_path, name, vocab=vocab or None, block_size=block_size, data_dir=data_dir,
                   keep_document=keep)
    print(f"prepared {raw_data_path} into {data_dir}/{name}/: {meta['documents']} article(s), "
          f"{meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, vocabulary {meta['vocab_size']:,}")
    return meta


def prepared_meta(raw_data_path: str, vocab: str) -> dict:
    """The meta.json of the dataset an earlier --raw run prepared, checked against the vocabulary given."""
    data_dir, name = dataset_location(raw_data_path)
    folder = Path(data_dir) / name
    try:
        meta = load_meta(folder)
    except (OSError, ValueError):
        raise UserError(f"no prepared data at {folder}/: add --raw to prepare {raw_data_path} first") from None
    if vocab:
        from tokenizer import Tokenizer
        try:
            itos = Tokenizer.from_vocab_file(vocab).itos
        except (OSError, ValueError) as e:
            raise UserError(f"--tokenizer_path {vocab}: {e}") from None
        if meta.get("itos") != itos:
            raise UserError(f"{folder} was prepared with another vocabulary than {vocab}: add --raw to prepare "
                            f"{raw_data_path} again with it")
    return meta


def default_vocab(given: dict) -> str:
    """--tokenizer_path, else GPT2-Chinese's default file when it exists, else '' (our own vocabulary)."""
    if "tokenizer_path" in given:
        if not Path(given["tokenizer_path"]).is_file():
            raise UserError(f"--tokenizer_path {given['tokenizer_path']} does not exist; give the vocab file "
                            "(GPT2-Chinese's cache/vocab_small.txt)")
        return given["tokenizer_path"]
    path = TRAIN_FLAGS["tokenizer_path"].default
    if Path(path).is_file():
        return path
    note(f"no {path}: the data gets a character vocabulary built from it (give one with --tokenizer_path)")
    return ""


def torchrun_hint(device: str, argv: list[str]) -> str:
    """The command that trains on the GPUs of --device 0,1 with one process each (the data prepared already)."""
    gpus = [d.strip() for d in device.split(",") if d.strip()]
    kept, i = [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--device":
            i += 1  # and its value
        elif arg != "--raw" and not arg.startswith("--device="):
            kept.append(arg)
    return (f"CUDA_VISIBLE_DEVICES={','.join(gpus)} torchrun --standalone --nproc_per_node={len(gpus)} train.py "
            + " ".join(shlex.quote(a) for a in kept))


def device_setting(given: dict, argv: list[str]) -> str | None:
    """Our --device for theirs, with the torchrun command when it names several GPUs."""
    device = given.get("device")
    if device is None:
        return None
    if "RANK" in os.environ:  # under torchrun each process takes its own GPU
        return "auto"
    if "," in device.strip(","):
        note(f"--device {device}: GPT2-Chinese split each batch over those GPUs (DataParallel); here that is one "
             f"process per GPU, started by torchrun: {torchrun_hint(device, argv)}  (the data prepared once, by a "
             "run like this one with --raw). "
             f"This process uses GPU {device.split(',')[0]} alone.")
    return device


def iterations(epochs: int, train_tokens: int, stride: int, batch_size: int, accumulation: int) -> int:
    """GPT2-Chinese's total steps: an epoch is train_tokens / stride windows, batch_size x accumulation a step."""
    return max(1, math.ceil(epochs * train_tokens / stride / (batch_size * accumulation)))


def train_command(argv: list[str], defaults: dict, types: dict) -> TrainCommand | None:
    """None when argv holds no GPT2-Chinese-only train.py flag. Otherwise prepare the data if --raw asks,
    and return our argv for their command (their flags first, then the rest of argv, which wins)."""
    if wants_help(argv, "train.py", TRAIN_FLAGS):
        return TrainCommand(["--help"], Path())  # our own list follows
    if not has_own_flag(argv, TRAIN_FLAGS, defaults):
        return None
    given, rest = split_flags(argv, TRAIN_FLAGS)
    own = get_config(defaults, rest, types=types)  # our own options, checked before any work
    if given.get("raw") and "RANK" in os.environ:
        raise UserError("--raw under torchrun would prepare the data once per process: run the command once without "
                        "torchrun first (or prepare.py), then torchrun it without --raw")
    final_model = Path(given.get("output_dir", TRAIN_FLAGS["output_dir"].default)) / "final_model"
    if final_model.is_dir() and any(final_model.iterdir()) and not own["overwrite"]:
        raise UserError(f"{final_model} already holds a model, which this run would replace at its end; move it, "
                        "or add --overwrite=True")
    try:
        check_export_target(final_model)
    except ValueError as e:
        raise UserError(str(e)) from None
    shape = model_shape(given, defaults)
    if "block_size" in given_keys(rest):  # ours, after theirs, wins over n_ctx (a corpus too small for n_ctx)
        shape["block_size"] = own["block_size"]
    vocab = default_vocab(given)
    raw_data_path = given.get("raw_data_path", TRAIN_FLAGS["raw_data_path"].default)
    if given.get("raw") and own["init_from"] != "resume":  # resume goes on with the data it began with
        meta = prepare_raw(raw_data_path, vocab, shape["block_size"],
                           given.get("min_length", TRAIN_FLAGS["min_length"].default))
    else:
        meta = prepared_meta(raw_data_path, vocab)
    if shape.get("vocab_size") not in (None, meta["vocab_size"]):
        raise UserError(f"--model_config says vocab_size {shape['vocab_size']} but the vocabulary has "
                        f"{meta['vocab_size']} tokens; set vocab_size to {meta['vocab_size']} in the JSON")
    for name in ("tokenized_data_path", "num_pieces", "writer_dir", "fp16_opt_level", "encoder_json", "vocab_bpe"):
        if name in given:
            note(f"--{name}: {TRAIN_FLAGS[name].here}")
    return TrainCommand(translate_train(given, shape, meta, argv) + rest, final_model)


def model_shape(given: dict, defaults: dict) -> dict:
    """n_layer, n_head, n_embd, block_size, dropout (and vocab_size, or None) of --model_config, else train.py's."""
    config_path = given.get("model_config", TRAIN_FLAGS["model_config"].default)
    if "model_config" in given or Path(config_path).is_file():
        shape = read_model_config(config_path)
    else:
        note(f"no {config_path}: the model takes train.py's default shape (give one with --model_config)")
        shape = {k: defaults[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout")}
    if given.get("pretrained_model"):  # from_pretrained keeps the folder's own dropout
        shape["dropout"] = folder_dropout(given["pretrained_model"], shape["dropout"])
    return shape


def translate_train(given: dict, shape: dict, meta: dict, argv: list[str]) -> list[str]:
    """Our --key=value options for their flags, the model shape and the prepared dataset."""
    value = {name: given.get(name, flag.default) for name, flag in TRAIN_FLAGS.items()}
    data_dir, name = dataset_location(value["raw_data_path"])
    accumulation, batch_size = value["gradient_accumulation"], value["batch_size"]
    if min(accumulation, batch_size, value["stride"], value["epochs"]) <= 0:
        raise UserError("--epochs, --batch_size, --stride and --gradient_accumulation must be above 0")
    max_iters = iterations(value["epochs"], meta["train_tokens"], value["stride"], batch_size, accumulation)
    out = [f"--dataset={name}", f"--data_dir={data_dir}", f"--out_dir={value['output_dir']}",
           *(f"--{k}={shape[k]}" for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout")),
           f"--batch_size={batch_size}", f"--gradient_accumulation_steps={accumulation}", f"--max_iters={max_iters}",
           f"--log_interval={max(1, value['log_step'] // accumulation)}", f"--grad_clip={value['max_grad_norm']}"]
    print(f"GPT2-Chinese command: {value['epochs']} epoch(s) of {meta['train_tokens']:,} tokens / stride "
          f"{value['stride']} windows, {batch_size} x {accumulation} windows a step: {max_iters:,} iterations")
    for theirs, ours in (("lr", "learning_rate"), ("warmup_steps", "warmup_iters"), ("pretrained_model", "init_from")):
        if theirs in given:
            out.append(f"--{ours}={given[theirs]}")
    device = device_setting(given, argv)
    if device is not None:
        out.append(f"--device={device}")
    if given.get("fp16"):
        import torch
        if torch.cuda.is_available():
            out.append("--dtype=float16")
        else:
            note("--fp16: no GPU here, so training runs in the CPU's own precision (float16 is for GPUs)")
    return out


def export_final_model(out_dir: str, folder: Path) -> Path:
    """Export out_dir's best checkpoint (ckpt.pt) as a Hugging Face folder at output_dir/final_model."""
    from checkpoint import load_model
    from hf import export_folder

    model, tok, _ = load_model(os.path.join(out_dir, "ckpt.pt"))
    try:
        export_folder(model, tok, folder)  # both pytorch_model.bin (transformers 2.x) and model.safetensors
    except (OSError, ValueError) as e:
        raise UserError(f"cannot export the model to {folder}: {e}") from None
    return folder


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
    from files import atomic_write_bytes

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
