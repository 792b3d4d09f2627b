"""
How good is a model on a novel, in nats per character on a whole split: the GPT alone, the memory (the
dataset's n-gram) alone, and the two mixed as sample.py mixes them.

    python evaluate.py --out_dir out-novel-cpu               # val split: model, n-gram, mixture, two-fold
    python evaluate.py --out_dir out-novel-cpu --json        # the same as one JSON object, for scripts
    python evaluate.py --out_dir out-novel-cpu --baseline    # also the KN trigram and modified-KN 5-gram
    python evaluate.py --init_from model/final_model --text chapter.txt --dataset mynovel
    python evaluate.py --dataset hongloumeng --copies FILE:samples/samples.txt   # spans copied from train.bin

One token is one character with our vocabulary, so nats per token are nats per character.
"""

import json
import math
import time
from pathlib import Path

import numpy as np

from novelgpt.checkpoint import check_vocab, load_model, read_checkpoint, resolve_source
from configurator import Options, UserError, get_config
from novelgpt.copycheck import DEFAULT_MIN_COPY, copy_summary, load_copy_index
from novelgpt.dataset import DEFAULT_NAME, load_meta, open_dataset
from novelgpt.preparing import check_encoding, check_errors, describe_encodings, prepare_default_corpus, read_documents
from novelgpt.quant import apply_quantization, check_quantize_mode
from novelgpt.files import FolderLock, atomic_torch_save
from novelgpt.mixture import PARTS, fit_mixture, mean_nats_of, memory_parts, mixture_loss, two_fold_loss
from novelgpt.scoring import token_log_probs
from novelgpt.ngram import DEFAULT_ORDER, kneser_ney_trigram_loss, load_ngram, modified_kneser_ney_loss
from novelgpt.runtime import init_runtime, script_errors
from novelgpt.tokenizer import Tokenizer

# ------------------------------------------------------------------ reporting

def loss_report(nats: float) -> str:
    """'4.450 nats, 6.420 bits, perplexity 85.6' for a loss in nats per token (= per character)."""
    return f"{nats:.3f} nats, {nats / math.log(2):.3f} bits, perplexity {math.exp(nats):.1f}"


# ------------------------------------------------------------------ command line

DEFAULTS = Options(
    out_dir=("out", "a run folder (its ckpt.pt), a .pt file, or a Hugging Face / GPT2-Chinese folder"),
    init_from=("", "the same as out_dir, for a .pt file or a model folder; wins over out_dir"),
    vocab=("", "vocab.txt for a model folder without one"),
    dataset=("", "dataset under data_dir to score; default: the checkpoint's own"),
    data_dir=("", "default: the checkpoint's own"),
    text=("", "a text file to score instead of the dataset's val split (UTF-8, UTF-16, GBK/GB18030, Big5: detected)"),
    encoding=("auto", "the --text file's encoding: auto (detected), or a Python codec name such as big5"),
    errors=("strict", "replace: score a --text file past bytes that do not decode (each becomes U+FFFD)"),
    context=(64, "every character is scored with at least this many characters of context (at most half a "
                 "short model's block_size when left at 64)"),
    ngram=("on", "on: also the memory (the dataset's n-gram) alone and the mixture; off: the GPT alone"),
    refit=(False, "fit the mixture's weights on the val split again (after preparing the dataset again)"),
    baseline=(False, "also print the Kneser-Ney trigram and modified Kneser-Ney 5-gram of the dataset"),
    json=(False, "print one JSON object (model, ngram, mixture, two_fold: nats per character) and nothing else"),
    device=("auto", "auto, cpu, cuda, cuda:1, mps"),
    dtype=("float32", "the scoring precision; float32 is exact, bfloat16 faster where the CPU computes it natively"),
    quantize=("none", "int8: score the model with int8 weights, as sample.py --quantize=int8 decodes (CPU)"),
    copies=("", "a text, or FILE:path, to check for spans copied verbatim from --dataset's training text "
                "(default hongloumeng); no model is loaded"),
    min_copy=(DEFAULT_MIN_COPY, "with --copies: the shortest span reported, in characters"),
)


def refit_command(source: str) -> str:
    return f"python evaluate.py --init_from={source} --refit=True"


def mixture_weights(checkpoint: dict, path: str, data, counts, model, config: dict, context: int, rt, say
                    ) -> np.ndarray:
    """The weights the checkpoint carries, or weights fitted on the dataset's val split (then stored in a run's
    ckpt.pt, so that sample.py and serve.py mix the same way)."""
    stored = checkpoint.get("mixture")
    if stored and not config["refit"]:
        if stored["dataset_fingerprint"] != data.fingerprint():
            raise UserError(f"{data.folder} was prepared again after {path}'s mixture was fitted; fit it again: "
                            f"{refit_command(path)}")
        if "pair_cache" not in stored["weights"]:
            raise UserError(f"{path}'s mixture was fitted by an earlier version, without the pair cache; fit it "
                            f"again: {refit_command(path)}")
        return np.array([stored["weights"][part] for part in PARTS])
    record = fit_mixture(model, counts, np.asarray(data.tokens("val")), data.fingerprint(),
                         context=context, autocast=rt.dtype)
    if path.endswith(".pt"):
        checkpoint = read_checkpoint(path)  # the weights too: load_model's metadata leaves them out
        checkpoint["mixture"] = record
        try:
            with FolderLock(Path(path).parent, "evaluation"):
                atomic_torch_save(checkpoint, path)
            say(f"  fitted the mixture's weights on {data.folder} val and stored them in {path}")
        except UserError as e:
            say(f"  note: the fitted weights are not stored ({e})")
    return np.array([record["weights"][part] for part in PARTS])


def check_copies(config: dict) -> None:
    """--copies: the longest span of the text found verbatim in the dataset's training text, and the copied share
    (the copy index is built and cached on first use, and its time said)."""
    folder = Path(config["data_dir"] or "data") / (config["dataset"] or DEFAULT_NAME)
    started = time.perf_counter()
    index = load_copy_index(folder)
    print(f"copy index of {folder}: {len(index.train):,} tokens, {time.perf_counter() - started:.2f} s")
    text = config["copies"]
    if text.startswith("FILE:"):
        try:
            text = Path(text[5:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {text[5:]} as UTF-8 text: {e}") from None
    print(copy_summary(text, Tokenizer.from_meta(load_meta(folder)), index, config["min_copy"]))


def evaluate(config: dict) -> dict[str, float]:
    """Print and return the model's loss on the val split (or --text), the memory's and the mixture's;
    with --baseline, the n-grams'."""
    rt = init_runtime(config["device"], config["dtype"], compile=False)
    say = (lambda line: None) if config["json"] else print
    source = config["init_from"] or config["out_dir"]
    check_quantize_mode(config["quantize"], str(rt.device))  # before the slow part
    path = resolve_source(source)
    model, tok, checkpoint = load_model(path, config["vocab"], rt.device)
    float_model, model = model, apply_quantization(model, config["quantize"])
    trained_on = checkpoint.get("config", {})
    name = config["dataset"] or trained_on.get("dataset", "")
    data_dir = config["data_dir"] or trained_on.get("data_dir", "data")
    data = None
    if name and config["text"] and not config["baseline"] and not (Path(data_dir) / name / "meta.json").exists():
        name = ""  # a text can be scored without the dataset: the GPT alone then
    if name:
        prepare_default_corpus(data_dir, name)  # when it is the one asked for and missing
        data = open_dataset(data_dir, name)
        check_vocab(tok, path, data.tokenizer, str(data.folder), "score the dataset it was trained on")
    results = {}
    if config["text"]:
        docs, _, encodings = read_documents(Path(config["text"]), config["encoding"], config["errors"])
        text = "\n".join(docs)  # one file's text (a folder's files, or a JSON file's documents, one after another)
        if encodings[0] != "utf-8" and config["encoding"] == "auto":
            say(f"read {config['text']} as {describe_encodings(encodings)} (detected; --encoding=NAME forces another)")
        ids, what = np.asarray(tok.encode(text)), config["text"]
        if len(ids) < 2:
            raise UserError(f"--text {config['text']} holds {len(ids)} character(s); scoring needs at least 2")
    else:
        if data is None:
            raise UserError(f"{path} does not say which dataset it was trained on; give --dataset (or --text)")
        ids, what = np.asarray(data.tokens("val")), f"{data.folder} val split"
    context = config["context"]
    if context >= model.config.block_size:
        if context != DEFAULTS["context"]:
            raise UserError(f"--context {context} must be below the model's block_size, {model.config.block_size}")
        context = model.config.block_size // 2  # the default is for our users' 512: a short model gets half its own
        say(f"note: the model's block_size is {model.config.block_size}; scoring with --context={context}")
    say(f"{what}: {len(ids):,} characters, each scored with at least {context} of context")
    p_gpt = np.exp(token_log_probs(model, ids, context=context, autocast=rt.dtype))
    results["model"] = mean_nats_of(p_gpt)
    say(f"  model {source}: {loss_report(results['model'])}")
    if config["ngram"] == "on" and data is None:
        say("  the GPT alone: no dataset named, so no memory to mix (give --dataset=<the one it was trained on>)")
    elif config["ngram"] == "on":
        order = checkpoint.get("mixture", {}).get("order", DEFAULT_ORDER)
        counts = load_ngram(data.folder, data.tokens("train"), tok.vocab_size, data.fingerprint(), order)
        weights = mixture_weights(checkpoint, path, data, counts, float_model, config, context, rt, say)
        parts = np.concatenate([p_gpt[None], memory_parts(counts, ids)])
        results["ngram"] = mean_nats_of(parts[1])
        results["mixture"] = mixture_loss(parts, weights)
        results["two_fold"] = two_fold_loss(parts)
        say(f"  the memory alone ({order}-gram of {data.folder} train): {loss_report(results['ngram'])}")
        say(f"  mixture (GPT {weights[0]:.2f}, {order}-gram {weights[1]:.2f}, cache {weights[2]:.2f}, pair cache "
            f"{weights[3]:.2f}): "
            f"{loss_report(results['mixture'])}")
        say(f"  mixture, weights fitted on one half and scored on the other (two-fold): "
            f"{loss_report(results['two_fold'])}")
    if config["baseline"]:
        if data is None:
            raise UserError("--baseline needs the dataset: give --dataset")
        train_ids = np.asarray(data.tokens("train"))
        results["trigram"] = kneser_ney_trigram_loss(train_ids, ids, tok.vocab_size)
        results["kn5"] = modified_kneser_ney_loss(train_ids, ids, tok.vocab_size, order=5)
        say(f"  Kneser-Ney trigram: {loss_report(results['trigram'])}")
        say(f"  modified Kneser-Ney 5-gram: {loss_report(results['kn5'])}")
    if config["json"]:
        print(json.dumps(results))
    return results


def main(argv: list[str] | None = None) -> None:
    advice = "use --dtype=bfloat16 or --quantize=int8 (CPU), or a machine with more memory"
    with script_errors("while scoring", lambda: advice):
        config = get_config(DEFAULTS, argv)
        if config["context"] < 0:
            raise UserError(f"--context must be 0 or more, got {config['context']}")
        if config["ngram"] not in ("on", "off"):
            raise UserError(f"--ngram must be on or off, got {config['ngram']!r}")
        check_encoding(config["encoding"])
        check_errors(config["errors"])
        if config["copies"]:
            return check_copies(config)
        try:
            evaluate(config)
        except ValueError as e:
            raise UserError(str(e).splitlines()[0]) from None

if __name__ == "__main__":
    main()
