"""The novel's memory a model generates with: the n-gram of its training text and the recent-text caches,
mixed with the weights its checkpoint carries (or fitted at start for a model folder).

    memory, note = load_memory(path, metadata, tok, model, mode="on")   # None and why, when the GPT runs alone
"""
from __future__ import annotations

from pathlib import Path

from configurator import UserError
from model import GPT
from novelgpt.checkpoint import check_vocab
from novelgpt.dataset import open_dataset
from novelgpt.mixture import DEFAULT_CACHE_SIZE, DEFAULT_PAIR_CACHE_SIZE, PARTS, Memory, fit_mixture
from novelgpt.ngram import DEFAULT_ORDER, load_ngram
from novelgpt.tokenizer import Tokenizer

FOLDER_FIT_TOKENS = 16_384  # val characters a model folder's mixture is fitted on at start (seconds, not minutes)


def load_memory(path: str, metadata: dict, tok: Tokenizer, model: GPT, mode: str = "on", dataset: str = "",
                data_dir: str = "") -> tuple[Memory | None, str]:
    """The novel's memory to mix into generation, and one line saying what was chosen. A run's checkpoint
    carries its weights (fitted by train.py or evaluate.py); a model folder gets weights fitted on the start of
    the named dataset's val split; without a dataset the GPT runs alone. metadata: load_model's."""
    if mode == "off":
        return None, "the GPT alone (--ngram=off)"
    checkpoint = metadata
    trained_on = checkpoint.get("config", {})
    name, data_dir = dataset or trained_on.get("dataset", ""), data_dir or trained_on.get("data_dir", "data")
    if not name:
        return None, f"the GPT alone: {path} names no dataset; give --dataset=<its training text> for the memory"
    if not (Path(data_dir) / name / "meta.json").exists():
        return None, f"the GPT alone: the dataset {Path(data_dir) / name} it was trained on is not here"
    data = open_dataset(data_dir, name)
    check_vocab(tok, path, data.tokenizer, str(data.folder), "mix in the memory of the dataset it was trained on")
    stored = checkpoint.get("mixture")
    if stored and stored["dataset_fingerprint"] != data.fingerprint():
        raise UserError(f"{data.folder} was prepared again after {path}'s mixture was fitted; fit it again: "
                        f"python evaluate.py --init_from={path} --refit=True (or --ngram=off)")
    order = stored["order"] if stored else DEFAULT_ORDER
    counts = load_ngram(data.folder, data.tokens("train"), tok.vocab_size, data.fingerprint(), order)
    if stored:
        weights = [stored["weights"].get(part, 0.0) for part in PARTS]
        how = "its stored weights"
    else:
        val = data.tokens("val")[:FOLDER_FIT_TOKENS]
        record = fit_mixture(model, counts, val, data.fingerprint(),
                             context=min(64, model.config.block_size // 2))
        weights = [record["weights"][part] for part in PARTS]
        how = f"weights fitted on {len(val):,} val characters"
    memory = Memory(counts, weights, stored["cache_size"] if stored else DEFAULT_CACHE_SIZE,
                    stored.get("pair_cache_size", DEFAULT_PAIR_CACHE_SIZE) if stored else DEFAULT_PAIR_CACHE_SIZE)
    return memory, (f"the memory of {data.folder} mixed in ({how}: GPT {weights[0]:.2f}, {order}-gram "
                    f"{weights[1]:.2f}, caches {weights[2]:.2f} + {weights[3]:.2f}); --ngram=off for the GPT alone")
