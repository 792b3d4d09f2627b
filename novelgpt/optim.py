"""The training recipe: optimizers (Muon for the blocks' matrices, AdamW for the rest), the learning-rate
schedule, and one optimizer step over micro-batches. Used by train.py and bench.py.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from model import GPT
from novelgpt.runtime import Runtime


def orthogonalize(update: torch.Tensor, steps: int) -> torch.Tensor:
    """Roughly the nearest semi-orthogonal matrix to each update (n, rows, cols), by quintic Newton-Schulz.

    float32 on a CPU: bfloat16 (what torch.optim.Muon uses) is far slower on a CPU without native bf16."""
    a, b, c = 3.4445, -4.7750, 2.0315  # coefficients that grow small singular values fast
    x = update.bfloat16() if update.is_cuda else update.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: X X^T is then the smaller product
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)  # singular values into [0, 1]
    x = x.contiguous()
    for _ in range(steps):  # x <- a x + (b G + c G G) x with G = x x^T; baddbmm fuses each scale-and-add
        gram = x @ x.mT  # (n, rows, rows), rows <= cols
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).to(update.dtype)


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised (Muon), for 2-D weights only.

    The update of torch.optim.Muon(adjust_lr_fn="original"), but matrices of one shape are orthogonalised
    together in one batched product, in float32 on a CPU."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_steps: int = 5) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            by_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - group["momentum"])
                by_shape.setdefault(tuple(p.shape), []).append((p, p.grad.lerp(buffer, group["momentum"])))
            for shape, pairs in by_shape.items():
                updates = orthogonalize(torch.stack([u for _, u in pairs]), group["ns_steps"])  # (n, rows, cols)
                scale = group["lr"] * max(1.0, shape[0] / shape[1]) ** 0.5  # the same RMS step for tall matrices
                for (p, _), update in zip(pairs, updates):
                    p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-scale)


def muon_matrices(model: GPT) -> list[torch.nn.Parameter]:
    """The parameters Muon trains: the blocks' weight matrices. Muon orthogonalises whole-matrix updates: right
    for the hidden linear maps, not for the embeddings (one row per token, which suits Adam's per-entry
    scaling), biases or LayerNorm gains."""
    return [p for p in model.transformer.h.parameters() if p.dim() == 2 and p.requires_grad]


@dataclass(frozen=True)
class OptimizerSettings:
    """What make_optimizers builds; train.py's settings of the same names (trainsettings.optimizer_settings)."""
    optimizer: str  # 'muon' or 'adamw'
    learning_rate: float  # AdamW's peak rate
    weight_decay: float  # AdamW's, on matrices and embeddings only
    beta1: float
    beta2: float
    muon_lr: float
    muon_momentum: float
    muon_weight_decay: float


@dataclass(frozen=True)
class Schedule:
    """The learning-rate curve, the same for every rate: linear warm-up, then 'cosine' decay to min_lr_ratio,
    or 'wsd' (stable, then a linear decay to min_lr_ratio over the last decay_frac); flat when not decay_lr."""
    lr_schedule: str  # 'wsd' or 'cosine'
    warmup_iters: int
    decay_frac: float
    min_lr_ratio: float
    decay_lr: bool = True


def make_optimizers(model: GPT, settings: OptimizerSettings, device_type: str) -> list[torch.optim.Optimizer]:
    """[AdamW] or, with optimizer='muon', [Muon for the blocks' weight matrices, AdamW for the rest].
    Each group keeps its peak rate as "peak_lr": the schedule scales it."""
    fused = device_type in ("cuda", "cpu") or None  # one kernel for all parameters instead of a loop of ops
    params = [p for p in model.parameters() if p.requires_grad]
    muon = muon_matrices(model) if settings.optimizer == "muon" else []
    taken = {id(p) for p in muon}
    rest = [p for p in params if id(p) not in taken]
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": settings.weight_decay},
                               {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                              lr=settings.learning_rate, betas=(settings.beta1, settings.beta2), fused=fused)
    optimizers = [adamw]
    if muon:
        optimizers.insert(0, Muon(muon, lr=settings.muon_lr, momentum=settings.muon_momentum,
                                  weight_decay=settings.muon_weight_decay))
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers


def lr_factor(it: int, schedule: Schedule, max_iters: int) -> float:
    """The schedule at iteration it of max_iters, as a fraction of each group's peak rate."""
    if not schedule.decay_lr:
        return 1.0
    if it < schedule.warmup_iters:
        return (it + 1) / (schedule.warmup_iters + 1)
    low = schedule.min_lr_ratio
    if schedule.lr_schedule == "wsd":
        start = decay_start(schedule, max_iters)
        if it < start:
            return 1.0
        return 1.0 + (low - 1.0) * min(1.0, (it - start + 1) / max(1, max_iters - start))
    progress = min(1.0, (it - schedule.warmup_iters) / max(1, max_iters - schedule.warmup_iters))
    return low + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - low)


def decay_start(schedule: Schedule, max_iters: int) -> int:
    """The first iteration whose rate is below the peak: until then a run's length can still change."""
    if schedule.lr_schedule == "wsd":
        return max(schedule.warmup_iters, max_iters - int(schedule.decay_frac * max_iters))
    return schedule.warmup_iters


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor


def train_step(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler,
               x: torch.Tensor, y: torch.Tensor, micro_batch: int, rt: Runtime, grad_clip: float,
               memory: torch.Tensor | None = None, memory_weight: float = 0.5) -> torch.Tensor:
    """One optimizer step over this process's rows x, y (B, T), in micro-batches of micro_batch rows;
    returns their mean loss (on the device, no host sync). memory (B, T): train through the mixture (GPT.forward)."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    starts = range(0, x.size(0), micro_batch)
    total = torch.zeros((), device=x.device)
    for k, start in enumerate(starts):
        rows = slice(start, start + micro_batch)
        # Under DDP, gradients are averaged across ranks only in the last micro-step's backward.
        with model.no_sync() if ddp and k < len(starts) - 1 else nullcontext():
            with rt.autocast():
                # only the loss is kept: holding the logits (rows, T, V) through backward costs ~0.1 GB per
                # micro-batch of 8 x 512 in bf16, and twice that at the next forward
                if memory is None:
                    loss = model(x[rows], y[rows])[1]
                else:
                    loss = model(x[rows], y[rows], memory=memory[rows], memory_weight=memory_weight)[1]
            scaler.scale(loss / len(starts)).backward()
        total += loss.detach().float()
    if grad_clip > 0:
        for optimizer in optimizers:  # every gradient unscaled before the norm is taken over all of them
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return total / len(starts)
