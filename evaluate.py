"""
How good is a model on a novel: n-gram baselines and a GPT's loss on a whole split, in nats per token.

    python evaluate.py --out_dir out-novel-cpu --baseline     # val split: model, KN trigram, modified-KN 5-gram
    python evaluate.py --init_from model/final_model --text chapter.txt --dataset mynovel

    kneser_ney_trigram_loss(train_ids, val_ids, vocab_size)       # the bar config/novel_cpu.py must beat
    modified_kneser_ney_loss(train_ids, val_ids, vocab_size, 5)   # the strongest count-based baseline
    whole_split_loss(model, val_ids, context=64)                  # a GPT on every token of val
    loss_report(nats)                                             # nats, bits and perplexity on one line

One token is one character with our vocabulary, so nats per token are nats per character.
"""

import math
from pathlib import Path

import numpy as np
import torch

from checkpoint import check_vocab, load_model, read_checkpoint, resolve_source
from configurator import UserError, exit_with_error, get_config
from dataset import open_dataset
from mixture import whole_split_loss
from ngram import kneser_ney_trigram_loss, modified_kneser_ney_loss
from runtime import init_runtime

# ------------------------------------------------------------------ reporting

def loss_report(nats: float) -> str:
    """'4.450 nats, 6.420 bits, perplexity 85.6' for a loss in nats per token (= per character)."""
    return f"{nats:.3f} nats, {nats / math.log(2):.3f} bits, perplexity {math.exp(nats):.1f}"


# ------------------------------------------------------------------ command line

DEFAULTS = dict(
    out_dir="out",  # a run folder (its ckpt.pt), a .pt file, or a Hugging Face / GPT2-Chinese folder
    init_from="",  # the same as out_dir, for a .pt file or a model folder; wins over out_dir
    vocab="",  # vocab.txt for a model folder without one
    dataset="",  # dataset under data_dir to score; default: the checkpoint's own
    data_dir="",  # default: the checkpoint's own
    text="",  # a UTF-8 text file to score instead of the dataset's val split
    context=64,  # every character is scored with at least this many characters of context
    baseline=False,  # also print the Kneser-Ney trigram and modified Kneser-Ney 5-gram of the dataset
    device="auto",
    dtype="float32",  # the scoring precision; float32 is exact, bfloat16 faster where the CPU computes it natively
    quantize="none",  # int8: score the model with int8 weights, as sample.py --quantize=int8 decodes (CPU)
)


def evaluate(config: dict) -> dict[str, float]:
    """Print and return the model's loss on the val split (or --text) and, with --baseline, the n-grams'."""
    rt = init_runtime(config["device"], config["dtype"], compile=False)
    source = config["init_from"] or config["out_dir"]
    path = resolve_source(source)
    model, tok = load_model(path, config["vocab"], rt.device, quantize=config["quantize"])
    trained_on = read_checkpoint(path).get("config", {}) if path.endswith(".pt") else {}
    name = config["dataset"] or trained_on.get("dataset", "")
    data_dir = config["data_dir"] or trained_on.get("data_dir", "data")
    results = {}
    if config["text"]:
        try:
            text = Path(config["text"]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --text {config['text']} as UTF-8: {e}") from None
        ids, what = tok.encode(text), config["text"]
    else:
        if not name:
            raise UserError(f"{path} does not say which dataset it was trained on; give --dataset (or --text)")
        data = open_dataset(data_dir, name)
        check_vocab(tok, path, data.tokenizer, str(data.folder), "score the dataset it was trained on")
        ids, what = np.asarray(data.tokens("val")), f"{data.folder} val split"
    print(f"{what}: {len(ids):,} characters, each scored with at least {config['context']} of context")
    results["model"] = whole_split_loss(model, ids, context=config["context"], autocast=rt.dtype)
    print(f"  model {source}: {loss_report(results['model'])}")
    if config["baseline"]:
        data = open_dataset(data_dir, name)
        train_ids = np.asarray(data.tokens("train"))
        results["trigram"] = kneser_ney_trigram_loss(train_ids, ids, tok.vocab_size)
        results["kn5"] = modified_kneser_ney_loss(train_ids, ids, tok.vocab_size, order=5)
        print(f"  Kneser-Ney trigram: {loss_report(results['trigram'])}")
        print(f"  modified Kneser-Ney 5-gram: {loss_report(results['kn5'])}")
    return results


def main(argv: list[str] | None = None) -> None:
    try:
        config = get_config(DEFAULTS, argv)
        if config["context"] < 0:
            raise UserError(f"--context must be 0 or more, got {config['context']}")
        evaluate(config)
    except UserError as e:
        exit_with_error(e)
    except ValueError as e:
        exit_with_error(str(e).splitlines()[0])


if __name__ == "__main__":
    main()
