"""
Speed figures, printed side by side with Hugging Face's GPT2LMHeadModel (the engine GPT2-Chinese trains with).

    python bench.py                      # every section
    python bench.py decode               # one section
    python bench.py train config/novel_small.py --batch_size=8   # training speed of any config
    python bench.py gpu --memory_budget_gb=8   # novel_small on CUDA: speed, MFU, memory vs estimate, sampling

Each section is one function in SECTIONS. transformers is a dev dependency, imported only here.
Quality (val loss, n-gram baselines) is evaluate.py's job; this file measures speed only.
Timings on a shared machine are noisy: run it on an idle one for figures to quote.
"""

import gc
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from novelgpt.checkpoint import checkpoint_state
from novelgpt.engine import Engine
from novelgpt.mixture import Memory
from configurator import UserError
from novelgpt.dataset import load_meta, vocab_size_of
from model import GPT, GPTConfig
from novelgpt.quant import quantize_int8
from novelgpt.runtime import Runtime, auto_dtype_note, cpu_has_bf16, init_runtime, peak_flops_for
from novelgpt.tokenizer import DEFAULT_VOCAB_SIZE, Tokenizer
from novelgpt.optim import make_optimizers, train_step
from novelgpt.trainsettings import DEFAULTS, TYPES, check_config, gpt_config, optimizer_settings, training_shape

# our users' GPT2-Chinese model, and a small one that trains quickly on a CPU
USERS_MODEL = GPTConfig(block_size=512, vocab_size=DEFAULT_VOCAB_SIZE, n_layer=10, n_head=12, n_embd=768)
SMALL_MODEL = GPTConfig(block_size=256, vocab_size=DEFAULT_VOCAB_SIZE, n_layer=4, n_head=4, n_embd=256)
CHARS_PER_TOKEN = 1.0  # GPT2-Chinese's vocabulary is one token per Chinese character
PROMPT = "宝玉笑道"  # the decode figures' prompt, as in the README's commands


def hf_gpt2(config: GPTConfig) -> torch.nn.Module:
    """A transformers GPT2LMHeadModel of the same size, dropout off as in ours."""
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size,
                                      n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=None, eos_token_id=None))


def seconds_per_call(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time of fn after warmup calls (the median resists other processes' bursts)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------ training step on the CPU

def train_step_fn(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  bf16: bool, hf: bool) -> Callable[[], None]:
    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss if hf else model(x, y)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def bench_train_step(argv: list[str]) -> None:
    """Tokens/s of a full training step (forward, backward, AdamW) on the CPU: transformers fp32 eager, ours
    eager and compiled in fp32 and (where the CPU has native bf16) under bf16 autocast, which dtype="auto" follows."""
    precisions = (False, True) if cpu_has_bf16() else (False,)
    print(f"train_step: {cpu_flags()}, {torch.get_num_threads()} threads; ours + fused AdamW, reference fp32 eager; "
          f"{auto_dtype_note('cpu', 'train')}")
    for name, config, batch_size, target in (("users' model", USERS_MODEL, 2, 1.7), ("small", SMALL_MODEL, 8, 1.5)):
        torch.manual_seed(0)
        tokens_per_step = batch_size * config.block_size
        data = torch.randint(0, config.vocab_size, (batch_size, config.block_size + 1))
        x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()

        reference = hf_gpt2(config).train()
        ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
        # transformers shifts the labels itself, so it gets x as labels and predicts the same targets as ours
        ref_s = seconds_per_call(train_step_fn(reference, ref_optimizer, x, y, bf16=False, hf=True), 1, 3)
        del reference, ref_optimizer
        print(f"  {name} (batch {batch_size} x {config.block_size}): transformers fp32 {tokens_per_step / ref_s:6.0f} "
              "tok/s", flush=True)
        for bf16 in precisions:
            ours = GPT(config).train()
            optimizer = make_optimizers(ours, optimizer_settings(dict(DEFAULTS, optimizer="adamw", learning_rate=6e-4)),
                                        "cpu")[0]
            eager_s = seconds_per_call(train_step_fn(ours, optimizer, x, y, bf16, hf=False), 1, 3)
            compiled_s = seconds_per_call(train_step_fn(torch.compile(ours), optimizer, x, y, bf16, hf=False), 2, 3)
            print(f"    ours {'bf16 autocast' if bf16 else 'fp32':13s}: eager {tokens_per_step / eager_s:6.0f} tok/s, "
                  f"compiled {tokens_per_step / compiled_s:6.0f} tok/s -> {ref_s / compiled_s:.2f}x transformers "
                  f"(target >= {target}x)", flush=True)
            del ours, optimizer
            torch._dynamo.reset()


# ------------------------------------------------------------------ decoding

def decode_ms_per_step(generate_fn: Callable[[int], object], new_tokens: int) -> float:
    """ms per step of generate_fn(new_tokens), with the prompt's cost measured apart and taken off."""
    def seconds(n: int) -> float:
        start = time.perf_counter()
        generate_fn(n)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    seconds(8)  # warm up (and compile, where compiled)
    prompt_s = seconds(1)
    return (seconds(new_tokens) - prompt_s) / (new_tokens - 1) * 1e3


def decode_models(config: GPTConfig, device: str) -> dict[str, Callable[[], torch.nn.Module]]:
    """Builders of the models bench_decode times, by name: ours in fp32, bf16 and int8 (on a CPU) with the
    same random weights, and transformers' GPT-2 in fp32."""
    torch.manual_seed(0)
    weights = GPT(config).state_dict()

    def ours(dtype: torch.dtype, int8: bool = False) -> Callable[[], torch.nn.Module]:
        def build() -> torch.nn.Module:
            model = GPT(config)
            model.load_state_dict(weights)
            model = model.eval().to(device=device, dtype=dtype)
            return quantize_int8(model) if int8 else model
        return build

    models = {"ours fp32": ours(torch.float32), "ours bf16": ours(torch.bfloat16)}
    if device == "cpu":
        models["ours int8"] = ours(torch.float32, int8=True)
    models["transformers fp32"] = lambda: hf_gpt2(config).eval().to(device)
    return models


def time_decode(model: torch.nn.Module, batch_size: int, prompt_len: int, new_tokens: int,
                memory: Memory | None = None) -> float:
    """ms per decode step (one new token in every row) of ours through Engine, or of transformers' generate
    with its KV cache; sampling top_k 8 (the default of sample.py and of GPT2-Chinese)."""
    device = next(model.parameters()).device
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), device=device)
    if isinstance(model, GPT):
        engine = Engine(model, memory)

        def generate(n: int) -> None:
            for _ in engine.stream(prompt, n, temperature=1.0, top_k=8):
                pass
    else:
        def generate(n: int) -> None:
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=True,
                           top_k=8, pad_token_id=0)
    return decode_ms_per_step(generate, new_tokens)


def users_checkpoint(folder: str) -> str:
    """Our users' model shape with random weights (seed 0) as a train.py checkpoint in folder; its path."""
    torch.manual_seed(0)
    model = GPT(USERS_MODEL)
    tok = Tokenizer.build(Counter(PROMPT), USERS_MODEL.vocab_size)
    path = os.path.join(folder, "ckpt.pt")
    torch.save(checkpoint_state(model, tok, {}, 0, float("nan")), path)
    return path


def sample_py_rate(checkpoint: str, flags: list[str], new_tokens: int) -> tuple[float, list[str]]:
    """ms per token as sample.py prints it ("N tokens in S s") for `python sample.py --init_from=checkpoint
    --start=宝玉笑道 --max_new_tokens=N --ignore_eos --seed=1 <flags>`, and the notes it wrote on stderr."""
    command = [sys.executable, "sample.py", f"--init_from={checkpoint}", f"--start={PROMPT}",
               f"--max_new_tokens={new_tokens}", "--ignore_eos", "--seed=1", *flags]
    result = subprocess.run(command, cwd=Path(__file__).resolve().parent, capture_output=True, text=True)
    rate = re.search(r"^(\d+) tokens in ([\d.]+) s", result.stderr, re.MULTILINE)
    if result.returncode != 0 or rate is None:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
    notes = [line.removeprefix("note: ") for line in result.stderr.splitlines() if line.startswith("note: ")]
    return float(rate.group(2)) / int(rate.group(1)) * 1e3, notes


def bench_decode(argv: list[str]) -> None:
    """Our users' model as sample.py runs it (a fresh process, its own "N tokens in S s" line) at batch 1 and 8,
    for each dtype and --quantize, beside transformers' GPT-2 fp32 generate with the same sampling (top_k 8).
    --tokens=N: new tokens per sample (default 300); --repeats=N: runs of each, the median shown (default 3);
    --busy: also batch 1 next to a busy process."""
    import tempfile
    options = dict(arg.removeprefix("--").split("=", 1) if "=" in arg else (arg.removeprefix("--"), "1")
                   for arg in argv)
    config = USERS_MODEL
    new_tokens = min(int(options.get("tokens", 300)), config.block_size - len(PROMPT))
    repeats = int(options.get("repeats", 3))
    print(f"decode: {cpu_flags()}; {torch.get_num_threads()} threads; users' model {config.n_layer} layers x "
          f"{config.n_embd}, vocabulary {config.vocab_size}; `python sample.py --start={PROMPT} "
          f"--max_new_tokens={new_tokens} --ignore_eos --seed=1` (default sampling: top_k 8), ms per token as it prints, median of {repeats} runs")
    print(f"  {'':34s} {'batch':>5s} {'ms/token':>8s} {'tokens/s':>8s} {'x transformers':>14s}")
    reference = {}
    hf = hf_gpt2(config).eval()
    for batch_size in (1, 8):
        reference[batch_size] = time_decode(hf, batch_size, len(PROMPT), new_tokens) / batch_size
        print(f"  {'transformers fp32 generate':34s} {batch_size:5d} {reference[batch_size]:8.2f} "
              f"{1e3 / reference[batch_size]:8.1f} {1:14.2f}", flush=True)
    del hf
    variants = {"sample.py (no dtype flag)": [], "sample.py --dtype=float32": ["--dtype=float32"],
                "sample.py --dtype=bfloat16": ["--dtype=bfloat16"], "sample.py --quantize=int8": ["--quantize=int8"]}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = users_checkpoint(folder)
        for name, flags in variants.items():
            for batch_size in (1, 8):
                runs = [sample_py_rate(checkpoint, flags + [f"--num_samples={batch_size}"], new_tokens)
                        for _ in range(repeats)]
                ms, notes = sorted(runs)[len(runs) // 2]  # the median run: this machine's neighbours come and go
                print(f"  {name:34s} {batch_size:5d} {ms:8.2f} {1e3 / ms:8.1f} {reference[batch_size] / ms:14.2f}",
                      flush=True)
                if batch_size == 1:
                    print("".join(f"      {note}\n" for note in notes if "dtype" in note or "int8" in note), end="")
    print("  targets (CPU, batch 1, best variant): <= 9 ms/token; batch 8 >= 5x the tokens/s of batch 1")
    if "busy" in options:
        bench_decode_busy(32, new_tokens)


def decode_in_child(variant: str, threads: int, wait_policy: str | None, prompt_len: int, new_tokens: int
                    ) -> tuple[float, int]:
    """(ms per step, threads) at batch 1 of `ours <variant>` in a fresh process, as OpenMP reads its wait
    policy (None: unset, OpenMP's default) once, when torch loads; threads 0: runtime.decode_threads()."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    code = (f"import torch, bench; from novelgpt import runtime; torch.set_num_threads({threads} or runtime.decode_threads()); "
            f"model = bench.decode_models(bench.USERS_MODEL, 'cpu')['ours {variant}'](); "
            f"print(bench.time_decode(model, 1, {prompt_len}, {new_tokens}), torch.get_num_threads())")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).resolve().parent,
                            capture_output=True, text=True, check=True)
    ms, threads_used = result.stdout.split()[-2:]
    return float(ms), int(threads_used)


def bench_decode_busy(prompt_len: int, new_tokens: int) -> None:
    """Batch 1 on an idle CPU and next to one process that keeps a core busy: torch's default threads with
    OpenMP's default and passive wait policies, against sample.py's passive wait and decode_threads()."""
    cores = os.cpu_count() or 1
    settings = [(f"{cores} threads, wait policy unset (torch's default)", cores, None),
                (f"{cores} threads, passive wait", cores, "PASSIVE"),
                ("decode_threads(), passive wait (sample.py, serve.py)", 0, "PASSIVE")]
    print(f"decode beside a busy process: ours at batch 1, {new_tokens} new tokens, each in a fresh process; "
          f"busy = `python -c 'while True: pass'`; load average now {os.getloadavg()[0]:.1f}")
    for variant in ("int8", "fp32"):
        for label, threads, policy in settings:
            idle_ms, idle_threads = decode_in_child(variant, threads, policy, prompt_len, new_tokens)
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                time.sleep(0.5)  # running before decode_threads looks
                busy_ms, busy_threads = decode_in_child(variant, threads, policy, prompt_len, new_tokens)
            finally:
                busy.kill()
                busy.wait()
            print(f"  ours {variant} {label:52s} idle {idle_ms:6.1f} ms/token ({idle_threads} threads), "
                  f"busy {busy_ms:6.1f} ms/token ({busy_threads}): {100 * idle_ms / busy_ms:3.0f}% of the idle "
                  "speed", flush=True)
    print("  target: next to one busy process, at least 40% of the idle speed")


def bench_tokenize(argv: list[str]) -> None:
    """Tokenizing rate on a synthetic 7.65M-character novel (our users' corpus size), and all of prepare.py."""
    import tempfile
    from novelgpt.preparing import count_characters, prepare
    from novelgpt.tokenizer import Tokenizer, common_characters
    rng = np.random.default_rng(0)
    hanzi = [c for c in common_characters() if "\u4e00" <= c <= "\u9fff"][:3000]
    # Zipf-like character frequencies, with punctuation and paragraph breaks, like a novel.
    weights = 1.0 / np.arange(1, len(hanzi) + 1)
    body = rng.choice(np.array(hanzi), size=7_650_000, p=weights / weights.sum())
    for char, rate in (("，", 0.06), ("。", 0.03), ("“", 0.01), ("”", 0.01), ("\n", 0.01), ("…", 0.002)):
        body[rng.random(body.size) < rate] = char
    text = "".join(body.tolist())
    t0 = time.perf_counter()
    tok = Tokenizer.build(count_characters([text]), DEFAULT_VOCAB_SIZE)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = tok.encode(text)
    t_encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok.decode(ids[:1_000_000])
    t_decode = time.perf_counter() - t0
    print(f"tokenize: {len(text):,} characters: vocabulary built in {t_build:.2f} s, encoded in {t_encode:.2f} s "
          f"({len(text) / t_encode / 1e6:.1f}M chars/s; target < 5 s), decode {1e6 / t_decode / 1e6:.1f}M tokens/s")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "novel.txt").write_text(text, encoding="utf-8")
        t0 = time.perf_counter()
        prepare(str(Path(tmp) / "novel.txt"), "novel", data_dir=tmp)
        print(f"  python prepare.py novel.txt (read, clean, vocabulary, encode, split, write): "
              f"{time.perf_counter() - t0:.2f} s")


# ------------------------------------------------------------------ training speed of a config

def bench_train(argv: list[str]) -> None:
    """tokens/s, ms/iter, MFU and peak memory of train.py's step for a config, on random tokens."""
    from configurator import get_config
    config = get_config(DEFAULTS, argv, types=TYPES)
    check_config(config)
    rt = init_runtime(config["device"], config["dtype"], config["compile"], seed=config["seed"])
    device, device_type = rt.device, rt.device_type
    model = GPT(gpt_config(config, DEFAULT_VOCAB_SIZE)).to(device)
    # a from-scratch run on 红楼梦 trains the head on the 4,343 tokens the text uses (train.py's used_vocab_head)
    used = torch.arange(4343 if config["used_vocab_head"] else DEFAULT_VOCAB_SIZE, device=device)
    model.train_head_on(used)
    optimizers = make_optimizers(model, optimizer_settings(config), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=rt.dtype == torch.float16)
    step_model = torch.compile(model) if rt.compile else model
    batch, block, accumulation = config["batch_size"], config["block_size"], config["gradient_accumulation_steps"]

    def step() -> None:
        data = used[torch.randint(0, len(used), (batch * accumulation, block + 1), device=device)]
        x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        train_step(step_model, optimizers, scaler, x, y, batch, rt, config["grad_clip"])
        if device_type == "cuda":
            torch.cuda.synchronize()

    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()  # the first step compiles, where compiled
    first_s = time.perf_counter() - start
    seconds = seconds_per_call(step, 1, 5)
    tokens_per_iter = batch * block * accumulation
    tokens_per_s = tokens_per_iter / seconds
    line = (f"train: {model.get_num_params() / 1e6:.1f}M parameters on {device} {rt.dtype_name}"
            f"{' compiled' if rt.compile else ''}, batch {batch} x {block} x {accumulation} accumulation: "
            f"{seconds * 1e3:.0f} ms/iter, {tokens_per_s:,.0f} tokens/s (first step {first_s:.1f} s)")
    if device_type == "cuda":
        peak = config["peak_flops"] or peak_flops_for(torch.cuda.get_device_name())
        line += (f", MFU {100 * model.estimate_mfu(batch * accumulation, seconds, peak):.1f}%, "
                 f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GB")
    print(line)
    print(f"  one epoch of a 7.65M-character novel: {7.65e6 / tokens_per_s / 60:.1f} minutes "
          f"(GPT2-Chinese on our users' RTX 4060 Laptop: 45 minutes)")


# ------------------------------------------------------------------ the GPU check: config/novel_small.py for real

def gpu_steps(config: dict, rt: Runtime, compiled: bool, batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
              ) -> tuple[GPT, float, int, int]:
    """Train a fresh model for config's warm-up and timed steps; (model, seconds per step, peak allocated and
    reserved bytes over the timed steps)."""
    model = GPT(gpt_config(config, config["vocab_size"])).to(rt.device)
    optimizers = make_optimizers(model, optimizer_settings(config), rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16)
    step_model = torch.compile(model) if compiled else model
    rows = config["batch_size"] * config["gradient_accumulation_steps"]

    def step() -> None:
        x, y = batches(rows)
        train_step(step_model, optimizers, scaler, x, y, config["batch_size"], rt, config["grad_clip"])

    for _ in range(config["warmup_steps"]):  # the first compiles; the optimizer state appears in the first
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(config["iters"]):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / config["iters"]
    return model, seconds, torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def emulate_budget(budget_gb: float) -> str:
    """Cap this process's allocator so that it, with the CUDA context already in use, fits budget_gb."""
    torch.ones(1, device="cuda") @ torch.ones(1, 1, device="cuda")  # the context and cuBLAS exist from here on
    free, total = torch.cuda.mem_get_info()
    in_use = total - free - torch.cuda.memory_reserved()  # the context (and any other process on the card)
    allowed = budget_gb * 2**30 - in_use
    if allowed <= 0:
        raise UserError(f"--memory_budget_gb={budget_gb} is less than the {in_use / 2**30:.2f} GB already in use")
    torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total))
    return (f"emulating a {budget_gb:g} GB card: the allocator may hold {allowed / 2**30:.2f} GB "
            f"({in_use / 2**30:.2f} GB of context and other processes are in use)")


def sample_seconds(model: GPT, dtype: torch.dtype, compiled: bool, chars: int = 1000) -> float:
    """Seconds to sample `chars` characters from a 16-token prompt, batch 1, timed after a warm-up call."""
    engine = Engine(model.to(dtype).eval())
    if compiled:
        engine.compile()
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=model.lm_head.weight.device)
    new_tokens = round(chars / CHARS_PER_TOKEN)
    for _ in range(2):  # the first call compiles and warms up; the second is timed
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in engine.stream(prompt, new_tokens, temperature=1.0, top_k=40):
            pass
        torch.cuda.synchronize()
    return time.perf_counter() - start


def gpu_mode_line(config: dict, rt: Runtime, compiled: bool, train_tokens: int,
                  batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> tuple[GPT | None, str]:
    """Train eager or compiled and describe it: speed, MFU, peak memory beside the estimate, time per epoch."""
    from novelgpt import footprint
    label = "compiled" if compiled else "eager   "
    est = footprint.estimate_footprint(training_shape(config, config["vocab_size"]), "cuda", rt.dtype_name, compiled)
    try:
        model, seconds, allocated, reserved = gpu_steps(config, rt, compiled, batches)
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return None, f"  {label}: out of memory (the estimate: {est.total / 2**30:.2f} GB in all)"
    rows = config["batch_size"] * config["gradient_accumulation_steps"]
    tokens_per_s = rows * config["block_size"] / seconds
    peak_flops = config["peak_flops"] or peak_flops_for(torch.cuda.get_device_name())
    mfu = f"MFU {100 * model.estimate_mfu(rows, seconds, peak_flops):.1f}%" if peak_flops else "MFU ? (--peak_flops)"
    epoch = f"{train_tokens / tokens_per_s / 60:.1f} min per epoch of {config['dataset']}, " if train_tokens else ""
    return model, (f"  {label}: {tokens_per_s:,.0f} tokens/s, {seconds * 1e3:.0f} ms/step, {mfu}, peak allocated "
                   f"{allocated / 2**30:.2f} GB (estimate {est.allocated_peak / 2**30:.2f} GB = "
                   f"{est.allocated_peak / allocated:.2f}x), reserved {reserved / 2**30:.2f} GB (estimate "
                   f"{(est.allocated_peak + est.allocator) / 2**30:.2f} GB); {epoch}"
                   f"{7.65e6 / tokens_per_s / 60:.1f} min per epoch of a 7.65M-character novel")


def bench_gpu(argv: list[str]) -> int:
    """config/novel_small.py (or the config given) on CUDA: tokens/s, MFU and peak memory with and without
    torch.compile, the memory estimate beside the measurement, time per epoch, time to sample 1,000 characters.
    --iters=N timed steps (300), --memory_budget_gb=8 emulates an 8 GB card on a bigger GPU."""
    if not torch.cuda.is_available():
        print("bench.py gpu: needs a CUDA GPU (torch.cuda.is_available() is False here)", file=sys.stderr)
        return 2
    from configurator import get_config
    if all(arg.startswith("--") for arg in argv):  # no config file given: our users' model
        argv = [str(Path(__file__).resolve().parent / "config" / "novel_small.py"), *argv]
    options = DEFAULTS.with_more(iters=(300, "timed steps"), warmup_steps=(10, "untimed steps before them"),
                                 memory_budget_gb=(0.0, "emulate a card of this many GB on a bigger GPU; 0 = off"))
    config = get_config(options, argv, types=TYPES)
    check_config(config)
    rt = init_runtime(config["device"], config["dtype"], None, seed=config["seed"])
    try:
        budget_line = emulate_budget(config["memory_budget_gb"]) if config["memory_budget_gb"] > 0 else ""
    except UserError as e:
        print(f"bench.py gpu: {e}", file=sys.stderr)
        return 2
    folder = Path(config["data_dir"]) / config["dataset"]
    config["vocab_size"] = vocab_size_of(folder)
    train_tokens = load_meta(folder)["train_tokens"] if (folder / "meta.json").exists() else 0
    generator = torch.Generator(device=rt.device).manual_seed(0)

    def batches(rows: int) -> tuple[torch.Tensor, torch.Tensor]:  # random tokens: the speed does not depend on them
        data = torch.randint(0, config["vocab_size"], (rows, config["block_size"] + 1), device=rt.device,
                             generator=generator)
        return data[:, :-1], data[:, 1:]

    print(f"gpu: {torch.cuda.get_device_name()}, {rt.dtype_name}, micro-batch {config['batch_size']} x "
          f"{config['block_size']} x {config['gradient_accumulation_steps']} accumulation, {config['optimizer']}, "
          f"{config['iters']} timed steps" + (f"; {budget_line}" if budget_line else ""))
    model = None
    for compiled in (False, True):
        trained, line = gpu_mode_line(config, rt, compiled, train_tokens, batches)
        model = trained or model
        print(line, flush=True)
    if model is not None:
        for compiled in (False, True):
            print(f"  sampling 1,000 characters (batch 1, {rt.dtype_name} weights{', compiled' if compiled else ''}): "
                  f"{sample_seconds(model, rt.dtype, compiled):.2f} s", flush=True)
    print("  goals: peak memory < 7 GB at micro-batch 8 x 512; MFU >= 40% on an H100 in bf16 with compile; "
          "estimate within 15% of the measurement")
    return 0


# ------------------------------------------------------------------ the novel's memory

def cpu_flags() -> str:
    """The CPU's model name and the vector extensions that decide which kernels are fastest."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU flags unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    have = [label for flag, label in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"),
                                      ("avx512_bf16", "BF16"), ("amx_tile", "AMX")) if flag in flags]
    return f"{name}, {os.cpu_count()} cores, {' '.join(have) or 'no AVX2'}"


def ngram_build_in_child(tokens: int) -> tuple[float, float]:
    """(seconds, peak GB) of building the modified-KN 5-gram (leave-one-out included) of the default corpus's
    train split repeated to `tokens` tokens, in a fresh process so that its peak memory is its own."""
    code = (f"import resource, sys, time, numpy as np; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from novelgpt.ngram import modified_kneser_ney\n"
            f"ids = np.resize(np.fromfile('data/hongloumeng/train.bin', dtype=np.uint16), {tokens})\n"
            "t = time.perf_counter(); modified_kneser_ney(ids, %d, 5); t = time.perf_counter() - t\n"
            "print(t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)" % DEFAULT_VOCAB_SIZE)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def bench_memory(argv: list[str]) -> None:
    """The memory's cost: building the n-gram for a 7.65M-character corpus (seconds, peak memory; --big: also
    100M), one query, and decoding our users' model at batch 1 and 8 with and without the mixture."""
    from novelgpt.ngram import modified_kneser_ney
    from novelgpt.preparing import prepare_default_corpus
    print(f"memory: {cpu_flags()}, {torch.get_num_threads()} threads")
    prepare_default_corpus("data", "hongloumeng")
    for tokens in (7_650_000, 100_000_000) if "--big" in argv else (7_650_000,):
        seconds, peak = ngram_build_in_child(tokens)
        print(f"  5-gram of {tokens:,} tokens (the 红楼梦 train split repeated): built in {seconds:.1f} s, "
              f"peak memory {peak:.2f} GB (targets for 7.65M: <= 30 s, <= 2 GB)", flush=True)
    train_ids = np.fromfile("data/hongloumeng/train.bin", dtype=np.uint16)
    counts = modified_kneser_ney(train_ids, DEFAULT_VOCAB_SIZE, 5)
    memory = Memory(counts, np.array([0.5, 0.45, 0.05]))
    for batch_size in (1, 8):
        histories = [train_ids[i * 1000:i * 1000 + 200].tolist() for i in range(batch_size)]
        logits = torch.randn(batch_size, DEFAULT_VOCAB_SIZE)
        ms = seconds_per_call(lambda: memory.mix(logits, histories), warmup=5, repeats=50) * 1e3
        print(f"  one mixing step (5-gram query, cache, mix) at batch {batch_size}: {ms:.2f} ms")
    torch.manual_seed(0)
    model = GPT(USERS_MODEL).eval()
    print(f"  {'users model fp32':20s} {'batch':>5s} {'alone ms':>9s} {'mixed ms':>9s} {'ratio':>6s}")
    for batch_size in (1, 8):
        alone = time_decode(model, batch_size, 32, 100)
        mixed = time_decode(model, batch_size, 32, 100, memory)
        print(f"  {'':20s} {batch_size:5d} {alone:9.1f} {mixed:9.1f} {mixed / alone:6.2f}  (target <= 1.10)",
              flush=True)


SECTIONS: dict[str, Callable[[list[str]], int | None]] = {
    "tokenize": bench_tokenize,
    "train_step": bench_train_step,
    "decode": bench_decode,
    "memory": bench_memory,
    "train": bench_train,
    "gpu": bench_gpu,
}


def main(argv: list[str]) -> int:
    """`python bench.py [section] [its arguments]`; no section: every section with its defaults."""
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"\nsections: {', '.join(SECTIONS)}")
        return 0
    if argv and argv[0] not in SECTIONS:
        print(f"bench.py: unknown section {argv[0]}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(os.cpu_count() or 1)
    if argv:
        return SECTIONS[argv[0]](argv[1:]) or 0
    else:
        for section in SECTIONS.values():
            section([])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
