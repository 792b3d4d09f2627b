"""Where the code runs: device, dtype, compile, autocast, seeding and torchrun processes, decided in one place.

Every script (train, sample, serve, evaluate, bench) calls init_runtime() so they share one rule:
    rt = init_runtime(device="auto", dtype="auto", compile=None, seed=1337)
    with rt.autocast():
        logits, loss = model(x, y)
"""
from __future__ import annotations

import functools
import os
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch
from torch.nn import functional as F

from configurator import UserError, exit_with_error

BF16_MARGIN = 0.85  # bf16 decodes only where its products take under 85% of fp32's time
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: str  # "cpu", "cuda:0", "mps"
    dtype: torch.dtype  # compute dtype: autocast in training, weight dtype in decoding
    compile: bool
    rank: int = 0  # torchrun process index; 0 (the master) when not under torchrun
    local_rank: int = 0
    world_size: int = 1

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def ddp(self) -> bool:
        return self.world_size > 1 or "RANK" in os.environ

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def autocast(self) -> ContextManager:
        """Mixed precision for training and evaluation; nothing to do in float32."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def busy_cores(seconds: float = 0.1) -> float:
    """How many cores other processes keep busy, from /proc/stat over `seconds` while this one sleeps;
    the 1-minute load average where /proc/stat is missing (not Linux)."""
    def times() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait (jiffies, every core together)
    try:
        total_0, idle_0 = times()
        time.sleep(seconds)
        total_1, idle_1 = times()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    return cores * (1 - (idle_1 - idle_0) / max(1, total_1 - total_0))


def decode_threads() -> int:
    """Threads for decoding on a CPU: the cores other processes leave idle, at least 1; OMP_NUM_THREADS wins.

    A decode step is about a hundred small parallel products; when one of their threads shares a core with
    a busy process, every product waits for it to be scheduled, and decoding nearly stops."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, round(cores - busy_cores())))


def use_decode_threads(device_type: str) -> None:
    """On a CPU, set torch's thread count to decode_threads() (sample.py, serve.py: once, at start)."""
    if device_type == "cpu":
        torch.set_num_threads(decode_threads())


def pick_device(name: str) -> str:
    """'auto' -> CUDA, else MPS, else CPU. A GPT2-Chinese GPU index ("0", "1", "0,1") falls back to the CPU
    with a notice when that GPU is missing; a named device that is missing is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    index = name.split(",")[0]
    if index.isdigit():  # GPT2-Chinese's --device 0,1
        if int(index) < torch.cuda.device_count():
            return f"cuda:{index}"
        print(f"note: no GPU {name} here ({torch.cuda.device_count()} CUDA devices); running on the CPU",
              file=sys.stderr)
        return "cpu"
    try:
        wanted = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N, mps or a GPU index") from None
    if wanted.type == "cuda" and (wanted.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device={name}, but this machine has {torch.cuda.device_count()} CUDA devices; "
                        "use --device=cpu (or auto)")
    if wanted.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps, but MPS is not available here; use --device=cpu (or auto)")
    if wanted.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device '{name}'; use auto, cpu, cuda, cuda:N or mps")
    return name


def pick_dtype(name: str, device_type: str, job: str = "train") -> torch.dtype:
    """'auto': bf16 where the hardware computes it natively, fp16 on older GPUs, else fp32; for decoding on a
    CPU with native bf16, whichever of fp32 and bf16 fastest_decode_dtype measures faster."""
    if name != "auto":
        if name not in DTYPES:
            raise UserError(f"--dtype must be auto, {', '.join(DTYPES)}; got '{name}'")
        if name == "float16" and device_type == "cpu":
            raise UserError("--dtype=float16 is not supported on the CPU; use bfloat16 or float32 (or auto)")
        if name == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU has no bfloat16; use --dtype=float16 (or auto)")
        return DTYPES[name]
    if device_type == "cuda":
        # bf16 from compute capability 8.0 (Ampere) on; older GPUs get fp16 (with a gradient scaler in training)
        return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    if device_type == "cpu" and cpu_has_bf16() and (job == "train" or fastest_decode_dtype() == "bfloat16"):
        return torch.bfloat16
    return torch.float32


@functools.cache
def decode_product_ms() -> dict[str, float]:
    """ms of one row through ten blocks' worth of the users' model's products (768 -> 2304, 768, 3072 -> 768),
    in float32 and bfloat16: the work of a decode step, which reads every weight once per token."""
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 10  # (out, in); 70 MB in fp32: not in cache
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        weights = [torch.full(shape, 0.01, dtype=dtype) for shape in shapes]
        inputs = [torch.full((1, shape[1]), 0.5, dtype=dtype) for shape in shapes]
        best = float("inf")
        for _ in range(4):  # the fastest of 3 after a warm-up pass: another process's burst does not decide
            start = time.perf_counter()
            for w, x in zip(weights, inputs):
                F.linear(x, w)
            best = min(best, time.perf_counter() - start)
        timings[str(dtype).removeprefix("torch.")] = best * 1e3
    return timings


def fastest_decode_dtype() -> str:
    """"bfloat16" where decode_product_ms times it faster than fp32 by a clear margin on this CPU, else "float32". Measured, as no flag
    tells: bf16 decoded 1.8x faster than fp32 on an AMD EPYC with AVX512-BF16 and 1.6x slower on a Xeon with AMX."""
    timings = decode_product_ms()
    # bf16 only when clearly faster: the two were within 10% of each other from run to run on the Xeon
    return "bfloat16" if timings["bfloat16"] < BF16_MARGIN * timings["float32"] else "float32"


def auto_dtype_note(device_type: str, job: str) -> str:
    """One line on what dtype='auto' chose for job on this device, and why."""
    dtype = str(pick_dtype("auto", device_type, job)).removeprefix("torch.")
    if device_type != "cpu":
        return f"dtype auto: {dtype} on {device_type}"
    if not cpu_has_bf16():
        return f"dtype auto: {dtype} (this CPU has no native bf16)"
    if job == "decode":
        timings = decode_product_ms()
        return (f"dtype auto: {dtype} for decoding, as measured (a step's products: "
                f"{', '.join(f'{name} {ms:.1f} ms' for name, ms in timings.items())})")
    return f"dtype auto: {dtype} for training on this CPU (native bf16)"


def pick_compile(setting: bool | None, device_type: str) -> bool:
    """None: on for CUDA on Linux. torch.compile on a GPU needs Triton, missing e.g. on Windows."""
    wanted = setting if setting is not None else (device_type == "cuda" and sys.platform == "linux")
    if wanted and device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            print("note: torch.compile is off: Triton is not installed (as on Windows)", file=sys.stderr)
            return False
    return wanted


def init_runtime(device: str = "auto", dtype: str = "auto", compile: bool | None = None,
                 seed: int | None = None, job: str = "train") -> Runtime:
    """Decide device, dtype (for job: "train" or "decode") and compile; start the torchrun process group
    when launched by torchrun."""
    rank, local_rank, world_size = 0, 0, 1
    if "RANK" in os.environ:  # started by torchrun
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available() and device in ("auto", "cuda"):
            device = f"cuda:{local_rank}"
    device = pick_device(device)
    device_type = device.split(":")[0]
    if device_type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores, where any remain
        torch.backends.cudnn.allow_tf32 = True
    if "RANK" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    if seed is not None:
        torch.manual_seed(seed + rank)  # each rank its own dropout stream
    return Runtime(device=device, dtype=pick_dtype(dtype, device_type, job), compile=pick_compile(compile, device_type),
                   rank=rank, local_rank=local_rank, world_size=world_size)


# Peak dense bf16 tensor FLOP/s with fp32 accumulate (the mode autocast trains in), matched as a
# substring of torch.cuda.get_device_name(); first match wins, so specific names come first.
PEAK_BF16_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("A100", 312e12), ("A10G", 70e12), ("L4", 121e12),
    ("RTX 4090", 165e12), ("RTX 4080", 97.5e12), ("RTX 4070 Laptop", 36e12), ("RTX 4070", 58e12),
    ("RTX 4060 Laptop", 29e12), ("RTX 4060 Ti", 44e12), ("RTX 4060", 30e12),
    ("RTX 3090", 71e12), ("RTX 3080", 59.5e12), ("RTX 3070", 40.6e12),
    ("RTX 3060 Laptop", 26e12), ("RTX 3060 Ti", 32.4e12), ("RTX 3060", 25.5e12),
]


def peak_flops_for(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU named as torch.cuda.get_device_name says; None if not in the table."""
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device_name.lower():
            return flops
    return None


def out_of_memory(error: BaseException) -> str | None:
    """'out of memory (tried to allocate 79.4 GB)' when error is the device or the CPU running out of memory
    (torch's OutOfMemoryError, the CPU allocator's RuntimeError, Python's MemoryError); else None."""
    text = str(error)
    if isinstance(error, MemoryError):
        return "out of memory"
    if not isinstance(error, RuntimeError) or not (isinstance(error, torch.OutOfMemoryError) or
                                                   "can't allocate memory" in text or "out of memory" in text.lower()):
        return None
    size = re.search(r"allocate (\d+) bytes", text)
    if size:
        return f"out of memory (tried to allocate {int(size.group(1)) / 2**30:.1f} GB)"
    size = re.search(r"allocate ([\d.]+ [KMGT]i?B)", text)
    return f"out of memory (tried to allocate {size.group(1)})" if size else "out of memory"


@contextmanager
def script_errors(phase: str, advice: Callable[[], str]) -> Iterator[None]:
    """A script's main body: a UserError is its one-line error (exit 2), Ctrl-C exits 130, and running out of
    memory says so with advice() (called then, when the settings are known) for the phase ("while scoring")."""
    try:
        yield
    except UserError as e:
        exit_with_error(e)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (RuntimeError, MemoryError) as e:
        short = out_of_memory(e)
        if short is None:
            raise
        exit_with_error(f"{short} {phase}: {advice()}")
