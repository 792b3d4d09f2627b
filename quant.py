"""int8 weight-only quantisation for decoding on a CPU: a quarter of fp32's weight bytes per token.

    model = quantize_int8(model)   # every Linear in the blocks and the (tied) LM head, in place

Decoding one token reads every weight once, so its speed is set by memory bandwidth; int8 weights with
one scale per output channel read 4x fewer bytes than fp32. The products run in torch's own int8
weight-pack kernel (aten._weight_int8pack_mm), which is vectorised on x86 for bf16 activations only, so
activations are rounded to bf16 for the product and the result goes back to the model's dtype.
On a CPU without AVX512 the kernel is compute-bound, not at the bandwidth floor, and torch.compile slows it
down, so int8 decodes eagerly (README's figures say by how much).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F

from configurator import UserError
from model import GPT

QUANTIZE_CHOICES = ("none", "int8")
# From this many rows (a long prompt's prefill, evaluation) a product is compute-bound, and dequantising
# the weight for one fp32 GEMM beats the int8 kernel's small tiles (1.7x at 1,024 rows on a 2-core AVX2 CPU).
GEMM_ROWS = 256


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 (out, in) and one bf16 scale per output row (out,)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()  # a copy: a tied embedding keeps its own float weight
        # the scale is rounded to bf16 first, so the int8 values are chosen for the scale the kernel uses
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)  # (out,)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
        # parameters without gradients, so parameter counts and .to(device) see them; .to(dtype) leaves int8 be
        self.weight = nn.Parameter(q.contiguous(), requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = w.size(1), w.size(0)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as the int8 values times their scales, (out, in) in dtype."""
        return (self.weight.to(dtype) * self.scale.to(dtype)[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, in)
        if rows.size(0) >= GEMM_ROWS:
            # activations rounded to bf16 as the kernel rounds them, so evaluation scores what decoding runs
            y = F.linear(rows.to(torch.bfloat16).to(rows.dtype), self.dequantized(rows.dtype))
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), self.weight,
                                                   self.scale.to(torch.bfloat16)).to(x.dtype)  # (M, out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 + bf16 scales"


def quantize_int8(model: GPT) -> GPT:
    """Replace every nn.Linear of the blocks and the LM head by an Int8Linear, in place; returns model.

    The token embedding keeps its float weight for the lookup even when the head is tied to it. For a CPU
    (the kernel is vectorised for x86 and ARM CPUs); a GPU has the bandwidth to decode in bf16."""
    check_quantize_mode("int8", str(next(model.parameters()).device))
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child.weight, child.bias))
    model.lm_head = Int8Linear(model.lm_head.weight, None)
    return model


def check_quantize_mode(mode: str, device: str = "cpu") -> None:
    """A one-line UserError unless mode is a --quantize choice that works on device ("cpu", "cuda:0", ...)."""
    if mode not in QUANTIZE_CHOICES:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}; got '{mode}'")
    if mode != "none" and not device.startswith("cpu"):
        raise UserError(f"--quantize={mode} is for decoding on a CPU, and the model runs on {device}; "
                        "leave --quantize out there (a GPU decodes in bf16/fp16), or add --device=cpu")


def apply_quantization(model: GPT, mode: str) -> GPT:
    """The model with the --quantize setting applied: 'none' leaves it, 'int8' calls quantize_int8."""
    check_quantize_mode(mode, str(next(model.parameters()).device))
    return quantize_int8(model) if mode == "int8" else model
