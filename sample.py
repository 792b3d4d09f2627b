"""Write continuations with a trained model, streamed to the terminal as they are generated.

    python sample.py --start "苏落妩媚一笑"
    python sample.py --out_dir out-novel-cpu --num_samples 3 --max_new_tokens 1000 --save_samples
    python sample.py --device 1 --length 1000 --tokenizer_path cache/vocab_small.txt \\
        --model_path model/final_model --prefix "[CLS]苏落妩媚一笑" --topp 1 --save_samples

The model is the best checkpoint in out_dir (written by train.py), or a GPT2-Chinese / Hugging Face
GPT-2 folder given as --init_from (alias --model_path) with its vocab.txt as --vocab. GPT2-Chinese's
generate.py option names work as aliases. Several samples are generated together as one batch.
"""

import glob
import itertools
import os
import random
import sys
import time
from typing import Callable, NamedTuple

import torch

from configurator import ConfigError, exit_with_error, get_config
from model import GPT, GPTConfig
from tokenizer import Tokenizer
import train

TYPES = dict(compile=bool)  # keys whose default None means auto
DEFAULTS = dict(
    out_dir="out",  # the best checkpoint, out_dir/ckpt.pt, is used
    init_from="",  # or a GPT2-Chinese / Hugging Face GPT-2 folder, or a .pt checkpoint file
    vocab="",  # vocab.txt for an --init_from folder (defaults to the folder's vocab.txt)
    start="[CLS]",  # the prompt, or FILE:path to read it from a file; [CLS] starts a new text
    num_samples=1,  # generated together as one batch
    max_new_tokens=500,  # characters per sample
    temperature=1.0,  # 0 means always the most likely token
    top_k=8,  # 0 = off; 8 is GPT2-Chinese's default, which our users' command relies on
    top_p=1.0,  # nucleus sampling, in (0, 1]; 1 = off
    repetition_penalty=1.0,  # > 1 makes tokens already in the text less likely
    ignore_eos=False,  # keep going past a generated [CLS] (end of text)
    seed=-1,  # -1 = a new random seed each run (printed, to repeat a run)
    device="auto",  # auto, cpu, cuda, cuda:1, mps, or a GPU index such as 0 or 1
    dtype="auto",  # auto, float32, bfloat16, float16
    compile=None,  # torch.compile the one-token decode step; None: auto (on for CUDA on Linux), or True/False
    save_samples=False,  # also write the samples to a new file in save_samples_path
    save_samples_path="samples",
    interactive=False,  # continue each line typed in the terminal, until Ctrl-D
)
# GPT2-Chinese generate.py's option names, so commands copied from its READMEs work unchanged
ALIASES = dict(length="max_new_tokens", prefix="start", nsamples="num_samples", topk="top_k", topp="top_p",
               model_path="init_from", tokenizer_path="vocab")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRAIN_COMMAND = "python train.py config/novel_cpu.py"


class Samples(NamedTuple):
    texts: list[str]  # prompt + continuation of each sample, exactly as streamed
    new_tokens: int  # tokens generated over the whole batch
    seconds: float  # generation time, prompt included, model loading not


# ------------------------------------------------------------------ devices and options

def pick_device(device: str) -> str:
    """Resolve `auto` and GPT2-Chinese style GPU indices ("1", "0,1"); CPU with a notice if the GPU is missing."""
    if device == "auto":
        return train.pick_device("auto")
    name = f"cuda:{device.split(',')[0]}" if device.replace(",", "").isdigit() else device
    try:
        wanted = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{device}'; use auto, cpu, cuda, cuda:N, mps or a GPU index") from None
    if wanted.type == "cuda" and (wanted.index or 0) >= torch.cuda.device_count():
        print(f"note: no GPU {device} here ({torch.cuda.device_count()} CUDA devices); running on the CPU",
              file=sys.stderr)
        return "cpu"
    if wanted.type == "mps" and not torch.backends.mps.is_available():
        print("note: MPS is not available here; running on the CPU", file=sys.stderr)
        return "cpu"
    return name


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """Decoding reads every weight once per token, so half precision is faster wherever it is native."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device == "cpu" and train.cpu_has_bf16() else torch.float32


def check_options(config: dict) -> None:
    """Raise ConfigError for option values that cannot work."""
    if config["num_samples"] < 1:
        raise ConfigError(f"--num_samples must be at least 1, got {config['num_samples']}")
    if config["max_new_tokens"] < 1:
        raise ConfigError(f"--max_new_tokens must be at least 1, got {config['max_new_tokens']}")
    if config["temperature"] < 0:
        raise ConfigError(f"--temperature must be 0 or more (0 = most likely token), got {config['temperature']}")
    if config["top_k"] < 0:
        raise ConfigError(f"--top_k must be 0 (off) or more, got {config['top_k']}")
    if not 0 < config["top_p"] <= 1:
        raise ConfigError(f"--top_p must be in (0, 1] (1 = off), got {config['top_p']}")
    if config["repetition_penalty"] <= 0:
        raise ConfigError(f"--repetition_penalty must be above 0 (1 = off), got {config['repetition_penalty']}")
    if config["dtype"] not in ("auto", *DTYPES):
        raise ConfigError(f"--dtype must be auto, {', '.join(DTYPES)}; got '{config['dtype']}'")
    if config["compile"] not in (None, True, False):
        raise ConfigError(f"--compile must be True or False (leave it out for auto), got {config['compile']!r}")


# ------------------------------------------------------------------ loading

def _vocab_from_file(path: str) -> Tokenizer:
    try:
        return Tokenizer.from_vocab_file(path)
    except FileNotFoundError:
        raise ConfigError(f"vocab file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"cannot use {path} as a vocab file: {e}") from None


def _load_checkpoint(path: str) -> tuple[GPT, Tokenizer]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = GPT(GPTConfig(**checkpoint["model_args"]))
        # a model trained under torch.compile saves its weights with this prefix
        state = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
        model.load_state_dict(state)
        tok = Tokenizer.from_meta(checkpoint["vocab"])
    except KeyError as e:
        raise ConfigError(f"{path} is not a checkpoint written by train.py (it has no {e})") from None
    except Exception as e:
        raise ConfigError(f"cannot load {path}: {str(e).strip().splitlines()[0]}") from None
    return model, tok


def _load_gpt2_folder(folder: str, vocab: str) -> tuple[GPT, Tokenizer]:
    if not vocab and not os.path.isfile(os.path.join(folder, "vocab.txt")):
        raise ConfigError(f"{folder} has no vocab.txt; give its vocabulary with --vocab "
                          "(GPT2-Chinese: --tokenizer_path cache/vocab_small.txt)")
    vocab = vocab or os.path.join(folder, "vocab.txt")
    tok = _vocab_from_file(vocab)
    try:
        model = GPT.from_hf_gpt2(folder)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if tok.vocab_size != model.config.vocab_size:
        raise ConfigError(f"{vocab} has {tok.vocab_size} tokens but the model in {folder} has "
                          f"{model.config.vocab_size}; give the vocab file it was trained with")
    return model, tok


def load_model(out_dir: str = "out", init_from: str = "", vocab: str = "", device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer: out_dir's best checkpoint, or init_from (a GPT-2 folder, a run folder or a .pt file)."""
    path = init_from or out_dir
    if not init_from and out_dir == DEFAULTS["out_dir"] and not glob.glob(os.path.join(out_dir, "*.pt")):
        # train.py's configs write to their own folders (out-novel-cpu, ...): take the newest run
        runs = sorted(glob.glob("out*/ckpt.pt"), key=os.path.getmtime)
        if runs:
            path = os.path.dirname(runs[-1])
            print(f"note: using {runs[-1]}, the newest checkpoint here (choose with --out_dir)", file=sys.stderr)
    if os.path.isfile(os.path.join(path, "config.json")):
        model, tok = _load_gpt2_folder(path, vocab)
    else:
        if os.path.isdir(path) or not init_from:
            best, latest = os.path.join(path, "ckpt.pt"), os.path.join(path, "last.pt")
            path = best if os.path.isfile(best) or not os.path.isfile(latest) else latest
            if path == latest:
                print(f"note: {best} not found; using the latest checkpoint, {latest}", file=sys.stderr)
        if not os.path.isfile(path):
            # runs trained with a config file write to their own out_dir, such as out-novel-cpu
            found = sorted(glob.glob("out*/ckpt.pt"))
            hint = (f"found {', '.join(found)}: pass --out_dir {os.path.dirname(found[0])}" if found else
                    f"train one with `{TRAIN_COMMAND}` and pass its out_dir as --out_dir")
            raise ConfigError(f"no checkpoint at {path}; {hint} (or --init_from a GPT2-Chinese model folder)")
        model, tok = _load_checkpoint(path)
        if vocab:
            given = _vocab_from_file(vocab)
            if given.itos != tok.itos:
                first = next((i for i, (a, b) in enumerate(zip(given.itos, tok.itos)) if a != b),
                             min(given.vocab_size, tok.vocab_size))
                raise ConfigError(f"{vocab} ({given.vocab_size} tokens) does not match the vocabulary in {path} "
                                  f"({tok.vocab_size} tokens; first difference at id {first}); leave --vocab out, "
                                  "the checkpoint carries its own")
    model.eval()
    return model.to(device=device, dtype=dtype), tok


def compile_decode_step(model: GPT, compile_option: bool | None, device: str) -> None:
    """torch.compile the one-token step (CUDA graphs on a GPU, frozen weights on a CPU); auto: CUDA on Linux."""
    wanted = compile_option
    if compile_option is None:
        wanted = device.startswith("cuda") and sys.platform == "linux"
    if not wanted:
        return
    if device.startswith("cuda"):
        try:
            import triton  # noqa: F401  (torch.compile's GPU backend; missing e.g. on Windows)
        except ImportError:
            print("note: torch.compile needs Triton, which is not installed here; running without it",
                  file=sys.stderr)
            return
    print("note: compiling the decode step; the first tokens wait for it", file=sys.stderr)
    model.compile_decode()


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


def sample(model: GPT, tok: Tokenizer, prompt: str, num_samples: int = DEFAULTS["num_samples"],
           max_new_tokens: int = DEFAULTS["max_new_tokens"], temperature: float = DEFAULTS["temperature"],
           top_k: int = DEFAULTS["top_k"], top_p: float = DEFAULTS["top_p"],
           repetition_penalty: float = DEFAULTS["repetition_penalty"], ignore_eos: bool = False,
           seed: int | None = None, on_text: Callable[[str], None] | None = None) -> Samples:
    """Continue prompt num_samples times as one batch; on_text receives sample 1's text piece by piece."""
    prompt_ids = tok.encode(prompt)
    if len(prompt_ids) == 0:
        raise ConfigError('empty prompt; give some text with --start, or --start "[CLS]" to begin a new text')
    device = model.lm_head.weight.device
    idx = torch.as_tensor(prompt_ids, device=device).unsqueeze(0).repeat(num_samples, 1)
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    # the text starts at the prompt; a leading [CLS] (rendered as a blank line) only marks a new text
    prompt_text = tok.decode(prompt_ids).lstrip("\n")
    texts = [[prompt_text] for _ in range(num_samples)]
    if on_text:
        on_text(prompt_text)
    stop_ids = set() if ignore_eos else {tok.cls_id}
    new_tokens = 0
    t0 = time.perf_counter()
    steps = model.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                  top_p=top_p if top_p < 1 else None, repetition_penalty=repetition_penalty,
                                  banned_ids=sorted({tok.unk_id, tok.pad_id}), stop_ids=sorted(stop_ids),
                                  generator=generator)
    for step in steps:
        for row, token in enumerate(step.tolist()):  # one transfer per step, which streaming needs anyway
            if token < 0:
                continue
            new_tokens += 1
            if token in stop_ids:
                continue  # the end-of-text marker itself is not part of the sample
            piece = tok.decode([token])
            texts[row].append(piece)
            if row == 0 and on_text:
                on_text(piece)
    return Samples(["".join(pieces) for pieces in texts], new_tokens, time.perf_counter() - t0)


# ------------------------------------------------------------------ output

def sample_header(n: int) -> str:
    """The line that opens sample n, as GPT2-Chinese's generate.py writes it."""
    return f"{'=' * 40} SAMPLE {n} {'=' * 40}"


def format_samples(texts: list[str]) -> str:
    """The samples in the layout of GPT2-Chinese's samples.txt."""
    return "".join(f"{sample_header(n)}\n\n{text.strip()}\n\n{'=' * 90}\n\n" for n, text in enumerate(texts, 1))


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


def run_prompt(model: GPT, tok: Tokenizer, prompt: str, config: dict, seed: int) -> Samples:
    """Generate for one prompt: sample 1 streamed, the others printed when the batch is done."""
    note = unknown_chars_message(tok, prompt)
    if note:
        print(note, file=sys.stderr)
    if config["num_samples"] > 1:
        write(sample_header(1) + "\n\n")
    result = sample(model, tok, prompt, config["num_samples"], config["max_new_tokens"], config["temperature"],
                    config["top_k"], config["top_p"], config["repetition_penalty"], config["ignore_eos"],
                    seed, on_text=write)
    write("\n")
    for n, text in enumerate(result.texts[1:], 2):
        write(f"\n{sample_header(n)}\n\n{text}\n")
    rate = result.new_tokens / max(result.seconds, 1e-9)
    print(f"{result.new_tokens} tokens in {result.seconds:.2f} s, {rate:.1f} tokens/s "
          f"({config['num_samples']} sample(s), seed {seed})", file=sys.stderr)
    if config["save_samples"]:
        try:
            print(f"saved to {save_samples(result.texts, config['save_samples_path'])}", file=sys.stderr)
        except OSError as e:
            raise ConfigError(f"cannot save the samples in {config['save_samples_path']}: {e}") from None
    return result


def read_prompt(start: str) -> str:
    """The --start text, or the contents of the file it names as FILE:path."""
    if not start.startswith("FILE:"):
        return start
    try:
        with open(start[5:], encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the prompt file {start[5:]} as UTF-8 text: {e}") from None


def interactive_loop(model: GPT, tok: Tokenizer, config: dict, seed: int) -> None:
    """Continue each line typed; Ctrl-C stops the current continuation, Ctrl-D (end of input) ends."""
    print("type a beginning and press Enter; Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            write("\n")
            return
        if not line.strip():
            continue
        try:
            run_prompt(model, tok, line, config, seed)
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
        seed += 1  # a different continuation for the same line typed again


def main(argv: list[str] | None = None) -> None:
    """The command line; every user error ends with a one-line message and exit status 2."""
    try:
        config = get_config(DEFAULTS, argv, ALIASES, types=TYPES)
        check_options(config)
        prompt = read_prompt(config["start"])
        device = pick_device(config["device"])
        dtype = pick_dtype(config["dtype"], device)
        model, tok = load_model(config["out_dir"], config["init_from"], config["vocab"], device, dtype)
        compile_decode_step(model, config["compile"], device)
        seed = config["seed"] if config["seed"] >= 0 else random.SystemRandom().randrange(2**31)
        if config["interactive"]:
            interactive_loop(model, tok, config, seed)
        else:
            run_prompt(model, tok, prompt, config, seed)
    except ConfigError as e:
        exit_with_error(e)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
