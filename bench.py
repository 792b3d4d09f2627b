"""
Speed figures, printed side by side with Hugging Face's GPT2LMHeadModel (the engine GPT2-Chinese trains with).

    python bench.py                      # every section
    python bench.py train_step decode    # only these

Each section is one function in SECTIONS. transformers is a dev dependency, imported only here.
Timings on a shared machine are noisy: run it on an idle one for figures to quote.
"""

import os
import sys
import time
from typing import Callable

import torch

from model import GPT, GPTConfig

# our users' GPT2-Chinese model, and a small one that trains quickly on a CPU
USERS_MODEL = GPTConfig(block_size=512, vocab_size=13317, n_layer=10, n_head=12, n_embd=768)
SMALL_MODEL = GPTConfig(block_size=256, vocab_size=13317, n_layer=4, n_head=4, n_embd=256)
CHARS_PER_TOKEN = 1.0  # GPT2-Chinese's vocabulary is one token per Chinese character


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 dot products (AVX512-BF16 or AMX), so bf16 autocast pays off."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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


def bench_train_step() -> None:
    """Tokens/s of a full training step (forward, backward, AdamW) on the CPU, ours vs transformers fp32."""
    bf16 = cpu_supports_bf16()
    print(f"train_step: CPU ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads), "
          f"ours {'bf16 autocast' if bf16 else 'fp32'} + torch.compile + fused AdamW, reference fp32 eager")
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

        ours = GPT(config).train()
        optimizer = ours.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
        eager_s = seconds_per_call(train_step_fn(ours, optimizer, x, y, bf16, hf=False), 1, 3)
        compiled_s = seconds_per_call(train_step_fn(torch.compile(ours), optimizer, x, y, bf16, hf=False), 2, 3)

        print(f"  {name} (batch {batch_size} x {config.block_size}): "
              f"transformers {tokens_per_step / ref_s:6.0f} tok/s, ours eager {tokens_per_step / eager_s:6.0f} tok/s, "
              f"ours compiled {tokens_per_step / compiled_s:6.0f} tok/s -> {ref_s / compiled_s:.2f}x "
              f"(target >= {target}x)")


# ------------------------------------------------------------------ decoding

def memory_bandwidth() -> float:
    """Bytes/s of a large tensor copy (read + write), the ceiling for a memory-bound decode step."""
    src = torch.empty(256 * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = seconds_per_call(lambda: dst.copy_(src), 2, 5)
    return 2 * src.numel() * src.element_size() / seconds


def decode_ms_per_token(generate_fn: Callable[[int], object], new_tokens: int) -> float:
    """ms per new token of generate_fn(new_tokens), with the prompt's cost measured apart and taken off."""
    def seconds(n: int) -> float:
        start = time.perf_counter()
        generate_fn(n)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    seconds(8)  # warm up (and compile, where compiled)
    prompt_s = seconds(1)
    return (seconds(new_tokens) - prompt_s) / (new_tokens - 1) * 1e3


def bench_decode() -> None:
    """ms/token for 1,000 new tokens from a 32-token prompt, ours vs transformers with its KV cache."""
    config, new_tokens, prompt_len = USERS_MODEL, 1000, 32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fast_dtype = torch.bfloat16 if device == "cuda" or cpu_supports_bf16() else torch.float32
    torch.manual_seed(0)
    reference = hf_gpt2(config).eval().to(device)
    ours = GPT(config).eval().to(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())  # the tied head counted once
    print(f"decode: {device}, {config.n_layer} layers x {config.n_embd}, sampling top_k 40, ms per step "
          f"(one new token in every row); transformers in fp32 with its KV cache, timed over "
          f"{config.block_size - prompt_len} tokens (its cache cannot go past n_positions), ours over {new_tokens}")
    if device == "cpu":
        bandwidth = memory_bandwidth()
        print(f"  floor: {weight_bytes / 1e6:.0f} MB of fp32 weights per token / {bandwidth / 1e9:.1f} GB/s "
              f"(tensor copy) = {weight_bytes / bandwidth * 1e3:.1f} ms/token; bf16 weights: "
              f"{weight_bytes / 2 / bandwidth * 1e3:.1f} ms/token")

    for batch_size in (1, 10):
        prompt = torch.randint(0, config.vocab_size, (batch_size, prompt_len), device=device)

        def ours_generate(n: int) -> None:
            for _ in ours.generate_stream(prompt, n, temperature=1.0, top_k=40):
                pass

        def reference_generate(n: int) -> None:
            reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=True,
                               top_k=40, pad_token_id=0)

        def report(name: str, ms: float) -> None:
            seconds_per_1000_chars = ms / (batch_size * CHARS_PER_TOKEN)  # each step adds batch_size tokens
            print(f"  batch {batch_size:2d} {name:42s} {ms:6.1f} ms/step, {seconds_per_1000_chars:5.1f} s per 1,000 "
                  f"characters, {ref_ms / ms:4.2f}x transformers")

        ref_ms = decode_ms_per_token(reference_generate, config.block_size - prompt_len)
        report("transformers fp32", ref_ms)
        ours.to(torch.float32)
        report("ours fp32", decode_ms_per_token(ours_generate, new_tokens))
        ours.to(fast_dtype)
        name = f"ours {str(fast_dtype).removeprefix('torch.')}"
        report(name, decode_ms_per_token(ours_generate, new_tokens))
        ours.compile_decode()
        mode = "CUDA graphs" if device == "cuda" else "frozen weights"
        report(f"{name}, compiled ({mode})", decode_ms_per_token(ours_generate, new_tokens))
        del ours.decode_step  # back to the eager step
    if device == "cpu":
        print("  target (CPU, batch 1): <= 20 ms/token")


SECTIONS: dict[str, Callable[[], None]] = {
    "train_step": bench_train_step,
    "decode": bench_decode,
}


def main(argv: list[str]) -> int:
    names = argv or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"bench.py: unknown section {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(os.cpu_count() or 1)
    for name in names:
        SECTIONS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
