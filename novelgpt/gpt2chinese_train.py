"""GPT2-Chinese's train.py command, run here unchanged: its flags mapped onto our train.py's.

    python train.py --model_config config/model_config_small.json --tokenizer_path cache/vocab_small.txt \\
        --raw_data_path data/train.json --epochs 15 --stride 512 --output_dir model/ --raw
"""
from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from configurator import UserError, get_config
from novelgpt.dataset import load_meta
from novelgpt.gpt2chinese import Flag, given_keys, has_own_flag, note, split_flags, wants_help
from novelgpt.hf import check_export_target

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
    from novelgpt.preparing import prepare, read_documents

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
        from novelgpt.tokenizer import Tokenizer
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
    from novelgpt.checkpoint import load_model
    from novelgpt.hf import export_folder

    model, tok, _ = load_model(os.path.join(out_dir, "ckpt.pt"))
    try:
        export_folder(model, tok, folder)  # both pytorch_model.bin (transformers 2.x) and model.safetensors
    except (OSError, ValueError) as e:
        raise UserError(f"cannot export the model to {folder}: {e}") from None
    return folder
