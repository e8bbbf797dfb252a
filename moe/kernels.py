"""The matmul kernel under every expert product on CPU: oneDNN where it is faster than torch.mm.

Shape legend: M rows, K reduced features, N out features.

Eager `torch.mm`/`F.linear` run fp32 on MKL's sgemm, which takes its AVX2 code path on AMD CPUs
even where they have AVX-512. oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, the kernel
torch.compile emits for CPU linears) does not: on the 2-core AMD EPYC reference host it is
4-9 % faster on each of the activation products of an expert (one thread, 512 x 768 x 3072;
fc1/fc2 forward and their input gradients), and level with MKL on the weight gradients, which
therefore stay on torch.mm (it writes into the preallocated gradient, oneDNN cannot). Results
agree with torch.mm to float rounding (~1e-6 relative).

Used only for float32 CPU tensors on x86-64 outside autocast, with oneDNN enabled
(`torch.backends.mkldnn`); everything else (float64 tests, bf16, CUDA, ARM, where torch.mm may
itself be oneDNN) goes through torch.mm / F.linear unchanged. Measured on AMD; on Intel CPUs MKL
has its AVX-512 path and the two should be level. MOE_ONEDNN=0 turns it off.
"""
from __future__ import annotations

import os
import platform

import torch
import torch.nn.functional as F
from torch import Tensor

_ONEDNN_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def use_onednn(x: Tensor) -> bool:
    """Whether products on `x` go through oneDNN (float32, CPU, oneDNN built, not switched off)."""
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and _ONEDNN_LINEAR is not None
        and _X86_64
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and os.environ.get("MOE_ONEDNN", "1") != "0"
    )


def linear_new(x_MK: Tensor, w_NK: Tensor, b_N: Tensor | None = None) -> Tensor:
    """x w^T (+ b) as a new tensor, no autograd; `w_NK` may be a view (w.t() gives x w)."""
    if use_onednn(x_MK):
        return _ONEDNN_LINEAR(x_MK, w_NK, b_N, "none", [], "")
    return torch.mm(x_MK, w_NK.t()) if b_N is None else torch.addmm(b_N, x_MK, w_NK.t())


def linear_into(x_MK: Tensor, w_NK: Tensor, b_N: Tensor | None, out_MN: Tensor) -> Tensor:
    """x w^T (+ b) written into `out_MN` (e.g. a row block of a larger output), no autograd."""
    if use_onednn(x_MK):  # oneDNN has no out=; the copy costs ~1 % of the product it replaces
        return out_MN.copy_(_ONEDNN_LINEAR(x_MK, w_NK, b_N, "none", [], ""))
    if b_N is None:
        return torch.mm(x_MK, w_NK.t(), out=out_MN)
    return torch.addmm(b_N, x_MK, w_NK.t(), out=out_MN)


class _Linear(torch.autograd.Function):
    """F.linear on 2-D input with oneDNN for the output and the input gradient."""

    @staticmethod
    def forward(ctx, x_MK: Tensor, w_NK: Tensor, b_N: Tensor | None) -> Tensor:
        ctx.has_bias = b_N is not None
        ctx.save_for_backward(x_MK, w_NK)
        return linear_new(x_MK, w_NK, b_N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_MN: Tensor):
        x_MK, w_NK = ctx.saved_tensors
        grad_MN = grad_MN.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = linear_new(grad_MN, w_NK.t()) if need_x else None
        grad_w = torch.mm(grad_MN.t(), x_MK) if need_w else None
        grad_b = grad_MN.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b


def linear(x_XK: Tensor, w_NK: Tensor, b_N: Tensor | None = None) -> Tensor:
    """F.linear (any leading dims, autograd), through oneDNN where `use_onednn` says so."""
    if (
        not use_onednn(x_XK)
        or w_NK.dtype != x_XK.dtype
        or (b_N is not None and b_N.dtype != x_XK.dtype)
        or torch.is_autocast_enabled("cpu")  # F.linear applies autocast's dtype; keep that path
    ):
        return F.linear(x_XK, w_NK, b_N)
    y_MN = _Linear.apply(x_XK.reshape(-1, x_XK.shape[-1]), w_NK, b_N)
    return y_MN.view(*x_XK.shape[:-1], w_NK.shape[0])
