"""Training memory, estimated before a run starts: what a GPU (or the CPU's RAM) must hold at the peak.

    shape = TrainingShape(GPTConfig(...), batch_size=8, gradient_accumulation_steps=4, optimizer="muon")
    est = estimate_footprint(shape, device_type="cuda", dtype="bfloat16", compiled=True)
    print(est.format())                       # the breakdown, one row per part
    micro = pick_micro_batch(shape, budget, "cuda", "bfloat16", True)

The activation formula counts what autograd saves for backward, tensor by tensor, for model.py's GPT.
It was checked against torch.autograd.graph.saved_tensors_hooks on the CPU (saved_bytes below): exact
to the byte in eager mode for the flash and math attention paths, float32 and bf16 autocast.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from configurator import UserError
from model import GPT, GPTConfig
from novelgpt.optim import muon_matrices
from novelgpt.runtime import Runtime, pick_compile, pick_dtype

GB = 2**30  # the project's "GB" (logs, --gpu_memory) is 2**30 bytes, as GPU cards are sized
CUDA_CONTEXT = 500 * 2**20  # CUDA context, cuBLAS workspace and loaded kernels: 300-500 MB, unseen by the allocator
ALLOCATOR_OVERHEAD = 0.10  # the caching allocator's rounding and fragmentation above the allocated peak
AUTO_MARGIN = 0.05  # --gpu_memory=auto keeps this share of the device free, for the display and other processes
LOW_PRECISION = ("bfloat16", "float16")


@dataclass(frozen=True)
class TrainingShape:
    """What the estimate needs of a training run: the model (its vocabulary too), the batch and the optimizer."""
    model: GPTConfig
    batch_size: int  # rows of one micro-batch
    gradient_accumulation_steps: int  # micro-batches per optimizer step, over all the processes
    optimizer: str  # 'muon' or 'adamw'


@dataclass
class Footprint:
    """Bytes of each part of a training run's peak memory, for one process."""
    micro_batch: int
    block_size: int
    vocab_size: int
    parameters: int
    device_type: str  # 'cuda', 'cpu' or 'mps'
    dtype: str  # compute dtype: 'float32', 'bfloat16' or 'float16'
    compiled: bool
    attention: str  # 'flash' (no T x T matrix kept) or 'math' (the CPU's path with attention dropout)
    optimizer_name: str
    weights: int
    gradients: int
    optimizer: int
    activations: int  # everything autograd saves for backward at this micro-batch, as saved_tensors_hooks sees it
    weight_copies: int  # autocast's low-precision copies of the weight matrices, saved for backward
    loss_peak: int  # the logits' transient copies at the loss (forward end and start of backward), beyond saved
    step_peak: int  # the optimizer step's temporaries (Muon's updates); activations are gone by then
    batch: int  # the step's token ids on the device
    cuda_context: int
    allocator: int

    @property
    def allocated_peak(self) -> int:
        """What torch.cuda.max_memory_allocated should report after a few steps."""
        static = self.weights + self.gradients + self.optimizer + self.batch
        return static + max(self.activations + self.weight_copies + self.loss_peak, self.step_peak)

    @property
    def total(self) -> int:
        """All the device memory the run needs: the allocated peak, the allocator's slack and the CUDA context."""
        return self.allocated_peak + self.allocator + self.cuda_context

    def format(self) -> str:
        """A readable table of the parts, in GB."""
        low = self.dtype in LOW_PRECISION
        adam = "AdamW's 2 moments" if self.optimizer_name == "adamw" else "Muon momentum + AdamW's 2 moments"
        rows = [
            ("weights (float32" + (", autocast computes from these: no extra master copy)" if low else ")"),
             self.weights),
            ("gradients (float32)", self.gradients),
            (f"optimizer state ({adam})", self.optimizer),
            (f"activations saved for backward ({self.attention} attention{', compiled' if self.compiled else ''})",
             self.activations),
        ]
        if low:
            rows.append((f"{self.dtype} copies of the weight matrices (autocast)", self.weight_copies))
        rows += [(f"loss: logits {self.micro_batch} x {self.block_size} x {self.vocab_size:,}, transient copies",
                  self.loss_peak),
                 ("optimizer step temporaries (after backward, not added)", self.step_peak),
                 ("token ids of the step", self.batch)]
        where = {"cuda": "torch.cuda.max_memory_allocated", "cpu": "RAM in tensors"}.get(self.device_type, "allocated")
        lines = [f"memory estimate: {self.parameters / 1e6:.1f}M parameters, micro-batch {self.micro_batch} x "
                 f"{self.block_size}, {self.device_type} {self.dtype}{', compiled' if self.compiled else ''}"]
        lines += [f"  {label:<70} {size / GB:7.2f} GB" for label, size in rows]
        lines.append(f"  {'peak allocated (' + where + ')':<70} {self.allocated_peak / GB:7.2f} GB")
        if self.device_type == "cuda":
            lines.append(f"  {f'allocator slack ({ALLOCATOR_OVERHEAD:.0%} of the peak)':<70} {self.allocator / GB:7.2f} GB")
            lines.append(f"  {'CUDA context, cuBLAS workspace, kernels':<70} {self.cuda_context / GB:7.2f} GB")
        lines.append(f"  {'total':<70} {self.total / GB:7.2f} GB")
        return "\n".join(lines)


# ------------------------------------------------------------------ the formula

def parameter_counts(config: GPTConfig, optimizer: str) -> dict[str, int]:
    """Parameter counts of the GPT that config describes, built on the meta device (no memory, no time):
    'total' (tied head counted once), 'muon' (what optim.py gives Muon), 'matrices' (the Linear weights)."""
    with torch.device("meta"):
        model = GPT(config)
    muon = muon_matrices(model) if optimizer == "muon" else []
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return {"total": sum(p.numel() for p in model.parameters()), "muon": sum(p.numel() for p in muon),
            "matrices": sum(w.numel() for w in linears), "tensors": len(list(model.parameters())),
            "largest_muon_group": max((sum(p.numel() for p in muon if p.shape == q.shape) for q in muon), default=0)}


def attention_path(device_type: str, dropout: float) -> str:
    """'flash' keeps no T x T matrix (CUDA's flash / memory-efficient kernels, with or without dropout; the
    CPU's flash kernel without dropout); 'math' is the CPU's fallback when attention dropout is on."""
    return "math" if device_type == "cpu" and dropout > 0 else "flash"


def layer_activations(config: GPTConfig, micro_batch: int, device_type: str, dtype: str) -> int:
    """Bytes one transformer block saves for backward (eager): each tensor named where it is counted."""
    C, H, T, N = config.n_embd, config.n_head, config.block_size, micro_batch * config.block_size
    a = 2 if dtype in LOW_PRECISION else 4  # bytes of an activation that autocast computes
    mask = (1 if device_type != "cpu" else a) if config.dropout > 0 else 0  # bool on CUDA; CPU's mask is a copy
    per_token = (
        2 * (4 * C + 8)  # both LayerNorms' float32 inputs (the residual stream) and their mean and rstd
        + 2 * a * C  # the inputs of c_attn and of the MLP's c_fc (LayerNorm outputs, cast by autocast)
        + 2 * 4 * a * C  # the MLP's hidden pre-GELU (c_fc's output) and post-GELU (c_proj's input)
        + a * C  # attention's output, c_proj's input
        + 2 * mask * C  # the two residual dropouts' masks
    )
    if attention_path(device_type, config.dropout) == "flash":
        per_token += 3 * a * C + 4 * H  # q, k, v (views of c_attn's output) and the log-sum-exp per head
    else:
        # the CPU's math path works in float32 even under autocast: scaled q, k^T, v, and per head a row of
        # T for the softmax, its dropout mask and the dropped copy (the T x T matrices)
        per_token += 3 * 4 * C + 3 * 4 * H * T
    return N * per_token


def head_activations(config: GPTConfig, micro_batch: int, device_type: str, dtype: str, compiled: bool) -> int:
    """Bytes saved outside the blocks: embeddings, final LayerNorm, LM head and the cross-entropy."""
    C, T, V, N = config.n_embd, config.block_size, config.vocab_size, micro_batch * config.block_size
    a = 2 if dtype in LOW_PRECISION else 4
    mask = (1 if device_type != "cpu" else 4) if config.dropout > 0 else 0  # the embeddings' dropout, float32
    saved = N * 8 + T * 8 + N * C * mask  # token ids, positions, embedding dropout mask
    saved += N * (4 * C + 8) + N * a * C  # ln_f's input and stats, the LM head's input
    if compiled:
        # compiled, the cross-entropy is fused: it keeps the logits in the compute dtype and a log-sum-exp per row
        saved += N * V * a + N * 4
    else:
        saved += N * V * 4  # eager: log_softmax's float32 output, which nll_loss reads too
    return saved + N * 8  # the targets


def loss_peak(config: GPTConfig, micro_batch: int, dtype: str, compiled: bool) -> int:
    """Bytes of the logits' transient copies at the worst moment (the start of backward), beyond what is saved.

    Eager: backward through nll_loss and log_softmax holds a float32 gradient of the log-probabilities and
    one of the logits at once: 2 x N x V x 4. Compiled, the fused cross-entropy's backward holds two
    buffers of N x V in the compute dtype. Both measured on the CPU (see the module's docstring)."""
    N, V = micro_batch * config.block_size, config.vocab_size
    if compiled:
        return 2 * N * V * (2 if dtype in LOW_PRECISION else 4)
    return 2 * N * V * 4


def step_peak(counts: dict[str, int]) -> int:
    """Muon's step holds every matrix's Nesterov update (float32) and, per shape, their stack and its
    low-precision copy for Newton-Schulz. AdamW's fused step needs no full-size temporaries."""
    return counts["muon"] * 4 + counts["largest_muon_group"] * (4 + 4 + 2)


def estimate_footprint(shape: TrainingShape, device_type: str = "cuda", dtype: str = "bfloat16", compiled: bool = True,
                    micro_batch: int | None = None, world_size: int = 1) -> Footprint:
    """Peak memory of one training process for shape at micro_batch (default: its batch_size)."""
    config, micro_batch = shape.model, micro_batch or shape.batch_size
    counts = parameter_counts(config, shape.optimizer)
    P = counts["total"]
    if shape.optimizer == "muon":
        optimizer = 4 * counts["muon"] + 8 * (P - counts["muon"])  # Muon's momentum; AdamW's exp_avg, exp_avg_sq
    else:
        optimizer = 8 * P
    optimizer += 4 * counts["tensors"]  # AdamW's per-tensor step counters (tensors when fused)
    activations = (config.n_layer * layer_activations(config, micro_batch, device_type, dtype)
                   + head_activations(config, micro_batch, device_type, dtype, compiled))
    rows = rows_per_process(shape, world_size)
    estimate = Footprint(
        micro_batch=micro_batch, block_size=config.block_size, vocab_size=config.vocab_size, parameters=P,
        device_type=device_type, dtype=dtype, compiled=compiled,
        attention=attention_path(device_type, config.dropout), optimizer_name=shape.optimizer,
        weights=4 * P, gradients=4 * P, optimizer=optimizer, activations=activations,
        weight_copies=2 * counts["matrices"] if dtype in LOW_PRECISION else 0,
        loss_peak=loss_peak(config, micro_batch, dtype, compiled), step_peak=step_peak(counts),
        batch=2 * 8 * rows * config.block_size, cuda_context=0, allocator=0)
    if device_type == "cuda":
        estimate.cuda_context = CUDA_CONTEXT
        estimate.allocator = int(ALLOCATOR_OVERHEAD * estimate.allocated_peak)
    return estimate


# ------------------------------------------------------------------ fitting a budget

def parse_budget(text: str) -> int:
    """'8GB', '7.5 GiB', '6000MB', '8' (GB) -> bytes; GB and GiB both mean 2**30, as GPUs are sized."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(g|gb|gib|m|mb|mib)?\s*", text.lower())
    if not match or float(match[1]) <= 0:
        raise UserError(f"--gpu_memory must be auto or a size such as 8GB or 7500MB, got {text!r}")
    return int(float(match[1]) * (2**20 if (match[2] or "g").startswith("m") else GB))


def rows_per_process(shape: TrainingShape, world_size: int) -> int:
    return shape.batch_size * shape.gradient_accumulation_steps // world_size


def pick_micro_batch(shape: TrainingShape, budget: int, device_type: str, dtype: str, compiled: bool,
                     world_size: int = 1) -> int:
    """The largest micro-batch whose estimate fits budget bytes and divides the rows of one optimizer step
    (so the tokens per step stay as configured); 0 when not even one row fits."""
    rows = rows_per_process(shape, world_size)
    for micro in sorted((d for d in range(1, rows + 1) if rows % d == 0), reverse=True):
        if estimate_footprint(shape, device_type, dtype, compiled, micro, world_size).total <= budget:
            return micro
    return 0


def with_micro_batch(shape: TrainingShape, micro: int, world_size: int = 1) -> TrainingShape:
    """shape with batch_size = micro and the accumulation that keeps batch_size x accumulation as it was."""
    rows = rows_per_process(shape, world_size)
    return dataclasses.replace(shape, batch_size=micro, gradient_accumulation_steps=rows // micro * world_size)


# ------------------------------------------------------------------ measuring (calibration and tests)

def saved_bytes(step: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes autograd saves for backward while step() runs the forward, each storage counted once; tensors
    sharing a storage with `exclude` (the parameters) are left out. step returns the loss."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = step()
    loss.backward()
    return sum(storages.values())


def optimizer_state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes of every tensor the optimizers keep between steps."""
    return sum(value.numel() * value.element_size() for optimizer in optimizers for state in optimizer.state.values()
               for value in state.values() if isinstance(value, torch.Tensor))


# ------------------------------------------------------------------ what train.py calls

def assumed_runtime(name: str, dtype: str, compile: bool | None) -> tuple[str, str, bool]:
    """(device_type, dtype, compiled) that a run on device name would get. Without a GPU, device 'auto' is taken
    to mean the CUDA GPU the estimate is for (bf16 from Ampere on), unless this machine has MPS."""
    if name == "auto":
        mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        device_type = "mps" if mps and not torch.cuda.is_available() else "cuda"
    else:
        device_type = "cuda" if name.startswith("cuda") or name.split(",")[0].isdigit() else name.split(":")[0]
    if dtype == "auto" and device_type == "cuda" and not torch.cuda.is_available():
        dtype = "bfloat16"
    elif dtype == "auto":
        dtype = str(pick_dtype("auto", device_type)).removeprefix("torch.")
    compiled = compile if compile is not None else device_type == "cuda" and sys.platform == "linux"
    if compiled and device_type == "cuda" and torch.cuda.is_available():
        compiled = pick_compile(True, "cuda")  # off where Triton is missing
    return device_type, dtype, compiled


def cuda_free_memory(device: str | None = None) -> tuple[int, int, str]:
    """(free bytes, total bytes, name) of a CUDA device, as the driver reports them now."""
    free, total = torch.cuda.mem_get_info(device)
    return free, total, torch.cuda.get_device_name(device)


def auto_budget(free: int, total: int) -> int:
    """--gpu_memory=auto: the free memory, plus the CUDA context that is already in it, less a margin."""
    return int(free + CUDA_CONTEXT - AUTO_MARGIN * total)


def fit_to_budget(shape: TrainingShape, budget: int, device_type: str, dtype: str, compiled: bool,
                  world_size: int = 1) -> tuple[TrainingShape, str]:
    """shape with the largest micro-batch that fits budget (the tokens per step unchanged) and one line
    saying what was chosen."""
    micro = pick_micro_batch(shape, budget, device_type, dtype, compiled, world_size)
    fitted = with_micro_batch(shape, max(micro, 1), world_size)
    est = estimate_footprint(fitted, device_type, dtype, compiled, world_size=world_size)
    block_size = shape.model.block_size
    tokens = fitted.batch_size * fitted.gradient_accumulation_steps * block_size
    line = (f"gpu_memory {budget / GB:.1f} GB: micro-batch {fitted.batch_size} x {block_size} with "
            f"{fitted.gradient_accumulation_steps} accumulation steps (the config: {shape.batch_size} x "
            f"{shape.gradient_accumulation_steps}), {tokens:,} tokens per step as configured; estimated peak "
            f"{est.total / GB:.2f} GB")
    if micro == 0:
        line += (" - more than the budget even at micro-batch 1: it may run out of memory; use a smaller "
                 "--block_size or model")
    return fitted, line


def budget_for(gpu_memory: str, batch_size: int, device_type: str, device: str | None = None,
               say: bool = True) -> int | None:
    """The byte budget --gpu_memory asks for: None when off, or 'auto' on a machine without CUDA (said if say,
    with the micro-batch kept)."""
    setting = gpu_memory.strip()
    if not setting:
        return None
    if setting.lower() != "auto":
        return parse_budget(setting)
    if device_type != "cuda" or not torch.cuda.is_available():
        if say:
            print(f"note: --gpu_memory=auto measures a CUDA GPU's free memory, and there is none here; give a "
                  f"size (--gpu_memory=4GB) to fit one; keeping micro-batch {batch_size}")
        return None
    free, total, _ = cuda_free_memory(device)
    return auto_budget(free, total)


def fit_line(est: Footprint, free: int, total: int, name: str) -> str:
    """One line comparing the estimate with the device's free memory, and what to do when it does not fit."""
    room = free + CUDA_CONTEXT  # this process's context is already in use, so it is not in `free`
    head = f"memory: estimated {est.total / GB:.2f} GB; {free / GB:.2f} of {total / GB:.2f} GB free on {name}"
    if est.total <= room:
        return head + ": fits"
    return (head + ": will NOT fit. Use --gpu_memory=auto (the largest micro-batch that fits, same tokens per step), "
            "or lower --batch_size and raise --gradient_accumulation_steps, or a smaller --block_size; "
            "out-of-memory steps will be redone at half the micro-batch")


def plan_footprint(shape: TrainingShape, gpu_memory: str, rt: Runtime) -> TrainingShape:
    """Before training: fit the micro-batch to gpu_memory (--gpu_memory), and on CUDA print the estimate against
    the free memory. Returns shape, with batch_size and gradient_accumulation_steps changed when a budget chose
    them."""
    if rt.device_type != "cuda" and not gpu_memory:
        return shape
    budget = budget_for(gpu_memory, shape.batch_size, rt.device_type, rt.device, say=rt.master)
    if rt.ddp and budget is not None:  # every rank must choose the same micro-batch: the smallest budget wins
        low = torch.tensor(float(budget), device=rt.device)
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        budget = int(low.item())
    if budget is not None:
        shape, line = fit_to_budget(shape, budget, rt.device_type, rt.dtype_name, rt.compile, rt.world_size)
        if rt.master:
            print(line)
    if rt.device_type == "cuda" and rt.master:
        est = estimate_footprint(shape, "cuda", rt.dtype_name, rt.compile, world_size=rt.world_size)
        print(est.format())
        print(fit_line(est, *cuda_free_memory(rt.device)))
    return shape


def estimate_report(shape: TrainingShape, gpu_memory: str, device: str, dtype: str, compile: bool | None) -> str:
    """`train.py --estimate_memory`: the breakdown for a run of shape on device (train.py's --device, --dtype,
    --compile, --gpu_memory), with no GPU and no dataset needed."""
    device_type, dtype, compiled = assumed_runtime(device, dtype, compile)
    lines = [f"for a {device_type} run in {dtype}{', compiled' if compiled else ''} with a vocabulary of "
             f"{shape.model.vocab_size:,}" + ("" if torch.cuda.is_available() or device_type != "cuda" else
                                              " (no GPU here: assumed; --device=cpu for the CPU's figure)")]
    budget = budget_for(gpu_memory, shape.batch_size, device_type)
    if budget is not None:
        shape, line = fit_to_budget(shape, budget, device_type, dtype, compiled)
        lines.append(line)
    est = estimate_footprint(shape, device_type, dtype, compiled)
    lines.append(est.format())
    if device_type == "cuda" and torch.cuda.is_available():
        lines.append(fit_line(est, *cuda_free_memory()))
    return "\n".join(lines)
