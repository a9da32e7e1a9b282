"""fp32 linear layers on CPU through kernels that use the machine's full vector width.

torch runs an fp32 ``F.linear`` on CPU through MKL, which on AMD CPUs takes its AVX2 code. On this project's
2-core Zen 5 machine a 2048^3 fp32 product reaches ~200 GFLOP/s there and ~450 through oneDNN (the library
torch already uses for convolutions and bf16), and the few rows of a decoding step stream the weight at
12-17 GB/s there against 25-40 (``docs/performance.md``). So, on CPU in fp32 (no autocast, not compiling):

* 1-4 rows without a gradient (decoding a batch of 1-2, guidance doubling it), weights of ``MM_MIN_WEIGHT``
  elements up: ``torch.mm(W, x.T)``, MKL's product with the weight as left operand, which streams it at ~38
  GB/s (oneDNN ~30, MKL's gemv ~17: one row goes in twice, its copy's result dropped; cached weights: F.linear);
* a product of at least ``ONEDNN_MIN_MACS`` multiply-adds: oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``,
  the kernel torch's Inductor calls on CPU), its gradients through oneDNN linears too;
* smaller ones ``F.linear``: a oneDNN call costs ~20 us before it computes, MKL's ~5.

Elsewhere (GPUs, bf16, a torch built without oneDNN) it is ``F.linear``. Results equal ``F.linear``'s up to
fp32 rounding (another summation order).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

MM_ROWS = range(1, 5)
# mm loses to F.linear below: AR de-tokenizer steps ([384, 128] at most) 1.59 -> 1.30 ms; Qwen2 [512, 512] even.
MM_MIN_WEIGHT = 2**17
# Where oneDNN starts to win, 8 rows with cold caches: [512, 512] (2.1M) 78 vs 92 us, [384, 128] (0.4M) 24 vs 20.
ONEDNN_MIN_MACS = 2**20


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ weight[N, K].T + bias`` through oneDNN (2D, contiguous, fp32, CPU)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = onednn_linear(grad, weight.t()) if ctx.needs_input_grad[0] else None
        # (x.T @ grad).T: oneDNN runs this orientation 1.7-2.9x faster than grad.T @ x at the shapes measured
        # (docs/performance.md), the head's [152670, 128] included.
        grad_weight = onednn_linear(x.t(), grad.t()).t() if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def _fast_path_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and weight.is_contiguous()
        and x.numel() > 0
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through the fastest kernel for its shape on CPU in fp32 (module docstring)."""
    if not _fast_path_applies(x, weight):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (
        bias is not None and bias.requires_grad))
    rows = flat.shape[0]
    if rows in MM_ROWS and not needs_grad and weight.numel() >= MM_MIN_WEIGHT:
        pair = torch.cat([flat, flat]) if rows == 1 else flat
        out = torch.mm(weight, pair.t()).t()[:rows].contiguous()  # a transposed result would slow the next product
        out = out if bias is None else out + bias
    elif rows * weight.numel() < ONEDNN_MIN_MACS:
        return F.linear(x, weight, bias)
    elif needs_grad:
        out = _OneDNNLinear.apply(flat, weight, bias)
    else:
        out = onednn_linear(flat, weight, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class CPULinear(nn.Linear):
    """An ``nn.Linear`` whose forward is :func:`cpu_linear`: same parameters, state dict and results."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_linear(x, self.weight, self.bias)


def use_cpu_linears(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Linear`` under ``module`` a :class:`CPULinear`, in place (its class only: the
    parameters, hooks and state-dict keys stay as they are), and return ``module``."""
    for child in module.modules():
        if type(child) is nn.Linear:
            child.__class__ = CPULinear
    return module
