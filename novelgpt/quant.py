"""int8 quantisation for decoding on a CPU: a quarter of fp32's weight bytes per token.

    model = quantize_int8(model)   # every Linear in the blocks and the (tied) LM head, in place

Decoding one token reads every weight once, so its speed is set by memory bandwidth; int8 weights with
one scale per output channel read 4x fewer bytes than fp32. torch has two int8 kernels for the product and
which is faster depends on the CPU, so quantize_int8 times both on the model's own layers and keeps the winner:
- "dynamic": fbgemm's dynamic int8 linear (quantized::linear_dynamic) quantises each product's activations to
  8 bits on the fly and multiplies int8 by int8 (VNNI where the CPU has it);
- "weight": the weight-only kernel (aten._weight_int8pack_mm), activations rounded to bf16.
Both use the same int8 weights and scales, so the choice changes only how the product is computed.
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from configurator import UserError
from model import GPT

QUANTIZE_CHOICES = ("none", "int8")
KERNELS = ("dynamic", "weight")
# From this many rows (a long prompt's prefill, evaluation) a product is compute-bound, and dequantising
# the weight for one fp32 GEMM beats the weight-only kernel's small tiles (1.7x at 1,024 rows on a 2-core AVX2 CPU).
GEMM_ROWS = 256


def cpu_has_vnni() -> bool:
    """True where the CPU has VNNI (AVX512-VNNI or AVX-VNNI): int8 products accumulate in 32 bits without the
    16-bit saturation of AVX2's, so activations may use all 8 bits."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 (out, in) and one bf16 scale per output row (out,), multiplied by
    `kernel` ("dynamic" or "weight", see the module's docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str = "weight"):
        super().__init__()
        w = weight.detach().float()  # a copy: a tied embedding keeps its own float weight
        # the scale is rounded to bf16 first, so the int8 values are chosen for the scale the kernels use
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)  # (out,)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
        # parameters without gradients, so parameter counts and .to(device) see them; .to(dtype) leaves int8 be
        self.weight = nn.Parameter(q.contiguous(), requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = w.size(1), w.size(0)
        self.kernel, self.packed = "weight", None
        self.use_kernel(kernel)

    def use_kernel(self, kernel: str) -> None:
        """Multiply with `kernel` from now on; "dynamic" packs the int8 weight for fbgemm (once)."""
        if kernel not in KERNELS:
            raise ValueError(f"unknown int8 kernel {kernel!r}; one of {', '.join(KERNELS)}")
        if kernel == "dynamic" and self.packed is None:
            zero_points = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # torch marks quantized tensors deprecated; the packed weight is not one
                warnings.simplefilter("ignore", UserWarning)
                qweight = torch._make_per_channel_quantized_tensor(self.weight.data, self.scale.double(),
                                                                   zero_points, 0)
            bias = None if self.bias is None else self.bias.detach().float()
            self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
            # without VNNI, 7-bit activations keep AVX2's 16-bit pair sums from saturating (torch's reduce_range)
            self.reduce_range = not cpu_has_vnni()
        self.kernel = kernel

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as the int8 values times their scales, (out, in) in dtype."""
        return (self.weight.to(dtype) * self.scale.to(dtype)[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "dynamic":  # the bias is packed with the weight
            # any leading shape: the kernel takes (..., in) as it is
            y = torch.ops.quantized.linear_dynamic(x.float().contiguous(), self.packed, self.reduce_range)
            return y.to(x.dtype)
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
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 + bf16 scales, {self.kernel}"


def int8_layers(model: GPT) -> list[Int8Linear]:
    """The model's Int8Linear layers in the order a decode step runs them."""
    return [m for m in model.modules() if isinstance(m, Int8Linear)]


@torch.no_grad()
def products_ms(layers: list[Int8Linear], kernel: str, repeats: int = 5) -> float:
    """ms of one decode step's products (one row through every layer, in order) with `kernel`; the fastest of
    `repeats` passes after a warm-up one, so that another process's burst does not decide."""
    for layer in layers:
        layer.use_kernel(kernel)
    inputs = [torch.randn(1, layer.in_features) for layer in layers]
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for layer, x in zip(layers, inputs):
            layer(x)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def quantize_int8(model: GPT, kernel: str = "auto") -> GPT:
    """Replace every nn.Linear of the blocks and the LM head by an Int8Linear, in place; returns model.

    kernel "auto" times both kernels on the model's layers and keeps the faster, said in one line on stderr.
    The token embedding keeps its float weight for the lookup even when the head is tied to it. For a CPU;
    a GPU has the bandwidth to decode in bf16."""
    check_quantize_mode("int8", str(next(model.parameters()).device))
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child.weight, child.bias))
    model.lm_head = Int8Linear(model.lm_head.weight, None)
    layers = int8_layers(model)
    if kernel == "auto":
        timings = {name: products_ms(layers, name) for name in KERNELS}
        kernel = min(timings, key=timings.get)
        print(f"note: int8 products with the {kernel} kernel, the faster here "
              f"({', '.join(f'{name} {ms:.1f} ms' for name, ms in timings.items())} per token's products)",
              file=sys.stderr)
    for layer in layers:
        layer.use_kernel(kernel)
        if kernel == "weight":
            layer.packed = None  # the other kernel's copy of the weights is not kept
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
