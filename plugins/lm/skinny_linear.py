"""Linear layers on a few rows at a time, the shape of decoding (a batch of 1 to 8, doubled by guidance).

On CPU, MKL is slow for 1-4 rows against a large weight: on the 2-core EPYC this project is measured on,
``F.linear(x [2, 896], W [4864, 896])`` streams ``W`` at ~8 GB/s and one row (a gemv) at ~17, where
``torch.mm(W, x.T)`` over two or more rows, the same products and sums with the weight as the left operand,
reaches ~34 GB/s (``docs/performance.md``). Over 16 rows (a real GEMM), on GPUs and in bf16 (oneDNN's bf16
kernels are faster as they are: a 0.5B decoder step at batch 1 takes 36 ms through them, 56 ms through this)
``F.linear`` stays.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# 1-4 rows: batch 1-2 with or without guidance; up to 16: batch 8 with guidance (0.5B shape, decode step
# 163-181 -> 139 ms at 16 rows, unchanged at 8; docs/performance.md).
SKINNY_ROWS = range(1, 17)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through ``torch.mm(weight, x.T)`` when ``x`` has 1-16 rows, on CPU, in fp32.

    One row goes in twice (its copy's result is dropped): MKL runs a single row as a gemv, ~17 GB/s here, and
    two as a GEMM that streams the same weight at ~34 GB/s. The output is made contiguous, since a transposed
    result would send the next layer's product down a slower kernel.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows not in SKINNY_ROWS or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, -1)
    if rows == 1:
        flat = torch.cat([flat, flat])
    out = torch.mm(weight, flat.contiguous().t()).t()[:rows].contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class SkinnyLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is :func:`skinny_linear`: same parameters, state dict and results."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return skinny_linear(x, self.weight, self.bias)


def use_skinny_linears(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Linear`` under ``module`` a :class:`SkinnyLinear`, in place (its class only: the
    parameters, hooks and state-dict keys stay as they are), and return ``module``."""
    for child in module.modules():
        if type(child) is nn.Linear:
            child.__class__ = SkinnyLinear
    return module
