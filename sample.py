"""Write continuations with a trained model, streamed to the terminal as they are generated.

    python sample.py --start "苏落妩媚一笑"
    python sample.py --out_dir out-novel-cpu --num_samples 3 --max_new_tokens 1000 --save_samples
    python sample.py --device 1 --length 1000 --tokenizer_path cache/vocab_small.txt \\
        --model_path model/final_model --prefix "[CLS]苏落妩媚一笑" --topp 1 --save_samples

The model is the best checkpoint in out_dir (written by train.py), or a GPT2-Chinese / Hugging Face
GPT-2 folder or a .pt file given as --init_from (alias --model_path), with --vocab for a folder without
vocab.txt. GPT2-Chinese's generate.py option names work as aliases. Several samples are one batch.
"""

import os

# Before torch loads its OpenMP runtime: decoding is many tiny products per token, and threads that
# spin-wait for a descheduled sibling made it 5x slower (27x at worst) beside any busy process on 2 cores;
# passive waiting does not. A value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import itertools
import random
import sys
import time
from typing import Callable, NamedTuple

from configurator import Options, UserError, check_text, get_config
from novelgpt.copycheck import CopyIndex, copy_summary
from novelgpt.engine import Engine, SamplingSettings
from novelgpt.files import check_path_names
from novelgpt.gpt2chinese_generate import generate_command, generate_samples, header, save_samples_file
from novelgpt.runtime import script_errors
from novelgpt.startup import load_writer, start_options
from novelgpt.tokenizer import Tokenizer

TYPES = dict(compile=bool)  # keys whose default None means auto
DEFAULTS = Options(
    **start_options("used"),
    start=("[CLS]", "the prompt, or FILE:path to read it from a file; [CLS] starts a new text"),
    **SamplingSettings.options(),
    seed=(-1, "-1 = a new random seed each run (printed, to repeat a run)"),
    save_samples=(False, "also write the samples to a new file in save_samples_path"),
    save_samples_path=("samples", "folder for --save_samples files"),
    interactive=(False, "continue each line typed in the terminal, until Ctrl-D"),
    min_copy=(12, "report spans of this many characters copied verbatim from the training text; 0 = off"),
)
MAX_PROMPT_BYTES = 16 << 20  # a FILE: prompt larger than this is not a prompt (a device, or a whole corpus)
# GPT2-Chinese generate.py's option names, so commands copied from its READMEs work unchanged
ALIASES = dict(length="max_new_tokens", prefix="start", nsamples="num_samples", topk="top_k", topp="top_p",
               model_path="init_from", tokenizer_path="vocab")


class Samples(NamedTuple):
    texts: list[str]  # prompt + continuation of each sample, exactly as streamed
    new_tokens: int  # tokens that went into the texts, over the whole batch
    seconds: float  # generation time, prompt included, model loading not


# ------------------------------------------------------------------ generation

def unknown_chars_message(tok: Tokenizer, text: str) -> str | None:
    """One line naming the prompt's characters that the vocabulary lacks, or None."""
    unknown = tok.unknown_chars(text)
    if not unknown:
        return None
    listed = ", ".join(f"'{c}' x{n}" for c, n in unknown.most_common(10))
    more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
    return (f"note: {len(unknown)} character(s) of the prompt are not in the vocabulary and become [UNK]: "
            f"{listed}{more}")


def sample(engine: Engine, tok: Tokenizer, prompt: str, settings: SamplingSettings,
           on_text: Callable[[str], None] | None = None) -> Samples:
    """Continue prompt settings.num_samples times as one batch; on_text receives sample 1's text as it comes."""
    # the text starts at the prompt; a leading [CLS] (rendered as a blank line) only marks a new text
    prompt_text = tok.decode(tok.encode(prompt)).lstrip("\n")
    texts = [[prompt_text] for _ in range(settings.num_samples)]
    if on_text:
        on_text(prompt_text)
    new_tokens, t0 = 0, time.perf_counter()
    try:
        for row, piece in engine.stream_text(tok, prompt, settings):
            new_tokens += 1
            texts[row].append(piece)
            if row == 0 and on_text:
                on_text(piece)
    except ValueError as e:
        raise UserError(str(e)) from None
    return Samples(["".join(pieces) for pieces in texts], new_tokens, time.perf_counter() - t0)


# ------------------------------------------------------------------ output

def format_samples(texts: list[str]) -> str:
    """The samples in the layout of GPT2-Chinese's samples.txt."""
    return "".join(f"{header(n)}\n\n{text.strip()}\n\n{'=' * 90}\n\n" for n, text in enumerate(texts, 1))


def save_samples(texts: list[str], folder: str) -> str:
    """Write the samples to folder/samples.txt, or samples_2.txt, ... : never over an existing file."""
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".samples.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(format_samples(texts))
    try:
        for n in itertools.count(1):
            path = os.path.join(folder, "samples.txt" if n == 1 else f"samples_{n}.txt")
            if os.path.exists(path):
                continue
            try:
                os.link(tmp, path)  # atomic, and fails rather than replace a file made meanwhile
            except FileExistsError:
                continue
            except OSError:  # a file system without hard links
                os.replace(tmp, path)
            return path
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write(text: str) -> None:
    """Print at once: the point of streaming is to see each character as it comes."""
    sys.stdout.write(text)
    sys.stdout.flush()


def run_prompt(engine: Engine, tok: Tokenizer, prompt: str, config: dict, seed: int,
               index: CopyIndex | None = None) -> Samples:
    """Generate for one prompt: sample 1 streamed, the others printed when the batch is done."""
    note = unknown_chars_message(tok, prompt)
    if note:
        print(note, file=sys.stderr)
    if config["num_samples"] > 1:
        write(header(1) + "\n\n")
    result = sample(engine, tok, prompt, SamplingSettings.from_config(config, seed), on_text=write)
    write("\n")
    for n, text in enumerate(result.texts[1:], 2):
        write(f"\n{header(n)}\n\n{text}\n")
    prompt_chars = len(tok.decode(tok.encode(prompt)).lstrip("\n"))
    continuations = [text[prompt_chars:] for text in result.texts]  # the copy check skips the user's own prompt
    report(result.new_tokens, result.seconds, seed, continuations, tok, index, config,
           lambda: save_samples(result.texts, config["save_samples_path"]))
    return result


def report(tokens: int, seconds: float, seed: int, continuations: list[str], tok: Tokenizer,
           index: CopyIndex | None, config: dict, save: Callable[[], str]) -> None:
    """After the samples: the rate, one copy-check line per sample, and the samples file when asked."""
    print(f"{tokens} tokens in {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tokens/s "
          f"({len(continuations)} sample(s), seed {seed})", file=sys.stderr)
    for n, text in enumerate(continuations, 1) if index is not None else ():
        print(f"sample {n}: {copy_summary(text, tok, index, config['min_copy'])}", file=sys.stderr)
    if config["save_samples"]:
        try:
            print(f"saved to {save()}", file=sys.stderr)
        except OSError as e:
            raise UserError(f"cannot save the samples in {config['save_samples_path']}: {e}") from None


def run_gpt2chinese(engine: Engine, tok: Tokenizer, prompt: str, config: dict, seed: int, index: CopyIndex | None,
                    batch_size: int) -> list[str]:
    """Generate as GPT2-Chinese's generate.py does: its console layout, its samples.txt, [CLS] a paragraph break."""
    t0 = time.perf_counter()
    texts, new_ids = generate_samples(engine, tok, prompt, SamplingSettings.from_config(config, seed), batch_size,
                                       write)
    report(sum(map(len, new_ids)), time.perf_counter() - t0, seed, [tok.decode(ids) for ids in new_ids], tok, index,
           config, lambda: save_samples_file(texts, config["save_samples_path"]))
    return texts


def read_prompt(start: str) -> str:
    """The --start text, or the contents of the file it names as FILE:path."""
    if not start.startswith("FILE:"):
        return start
    path = start[5:]
    try:
        if not os.path.isfile(path) and os.path.exists(path):
            raise UserError(f"the prompt file {path} is not a regular file; give a text file")
        if os.path.getsize(path) > MAX_PROMPT_BYTES:
            raise UserError(f"the prompt file {path} is {os.path.getsize(path):,} bytes; a prompt is at most "
                            f"{MAX_PROMPT_BYTES:,} (only the model's last block_size characters count anyway)")
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"the prompt file {path} is not UTF-8 text (byte {e.start:,}: {e.reason}); save it as UTF-8") \
            from None
    except OSError as e:
        raise UserError(f"cannot read the prompt file {path}: {e.strerror or e}") from None


def check_samples_folder(folder: str) -> None:
    """Before any generating: the samples folder can be made and written (not read-only, not a file)."""
    check_path_names(folder, "--save_samples_path")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"cannot save the samples in --save_samples_path {folder}: it is a file, not a folder; "
                        "give a folder for the samples")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".probe.{os.getpid()}.tmp")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot save the samples in --save_samples_path {folder} ({e.strerror or e}); "
                        "give a folder you can write to") from None


def read_line() -> str | None:
    """One line typed at the prompt, or None at the end of input; bytes that are not UTF-8 are refused."""
    try:
        line = input("> ")
    except EOFError:
        return None
    try:
        return check_text(line, "that line")
    except UserError as e:
        print(e, file=sys.stderr)  # the line is skipped: the loop asks for the next one
        return ""


def interactive_loop(engine: Engine, tok: Tokenizer, config: dict, seed: int, index: CopyIndex | None) -> None:
    """Continue each line typed; Ctrl-C stops the current continuation, Ctrl-D (end of input) ends."""
    print("type a beginning and press Enter; Ctrl-D ends", file=sys.stderr)
    # bytes that are not UTF-8 reach the line as lone surrogates, which read_line refuses, instead of an error in input()
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        line = read_line()
        if line is None:
            write("\n")
            return
        if not line.strip():
            continue
        try:
            run_prompt(engine, tok, line, config, seed, index)
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
        seed += 1  # a different continuation for the same line typed again


def main(argv: list[str] | None = None) -> None:
    """The command line; every user error ends with a one-line message and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    config = dict(DEFAULTS)

    def advice() -> str:
        return (f"lower --num_samples (now {config['num_samples']}) or --max_new_tokens (now "
                f"{config['max_new_tokens']}), or use --quantize=int8 on a CPU")

    with script_errors("while generating", advice):
        chinese = generate_command(argv, DEFAULTS)  # GPT2-Chinese's generate.py flags, mapped onto ours
        config = get_config(DEFAULTS, chinese.argv if chinese else argv, ALIASES, types=TYPES)
        try:
            SamplingSettings.from_config(config).check()
        except ValueError as e:
            raise UserError(f"--{e}") from None
        prompt = check_text(read_prompt(config["start"]), "the prompt")
        if config["save_samples"]:
            check_samples_folder(config["save_samples_path"])
        default_out = not config["init_from"] and config["out_dir"] == DEFAULTS["out_dir"]
        writer = load_writer(config, newest_fallback=default_out, compile_note="the first tokens wait for it")
        engine, tok = writer.engine, writer.tok
        if chinese and chinese.length_from_model:
            config["max_new_tokens"] = engine.model.config.block_size  # --length -1: the model's n_ctx
        if not config["interactive"] and len(tok.encode(prompt)) == 0:
            raise UserError('empty prompt; give some text with --start, or --start "[CLS]" to begin a new text')
        writer.mix_memory(config)
        index = writer.copy_index() if config["min_copy"] > 0 else None
        seed = config["seed"] if config["seed"] >= 0 else random.SystemRandom().randrange(2**31)
        if config["interactive"]:
            interactive_loop(engine, tok, config, seed, index)
        elif chinese:
            run_gpt2chinese(engine, tok, prompt, config, seed, index, chinese.batch_size)
        else:
            run_prompt(engine, tok, prompt, config, seed, index)


if __name__ == "__main__":
    main()
