"""Merged-weight execution of linear experts for data-independent routing.

Shape legend: B batch, L sequence, I in features, O out features, E experts, K top-k,
S segments.

When every token of a segment shares one decision (experts e_k, gates g_k), the gate-weighted
mixture of linear experts equals ONE linear with merged parameters:
    sum_k g_k (x W_{e_k}^T + b_{e_k}) = x (sum_k g_k W_{e_k})^T + sum_k g_k b_{e_k}.
So the layer costs one dense matmul per segment plus a K*O*I merge, independent of E, and
gradients still reach every chosen expert and, through g, the router. This is exactly the
released model's computation (OFFICIAL.md 2.3), in training and in inference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import linear
from .memory import empty_like_large


class _MergeExperts(torch.autograd.Function):
    """W_s = sum_k g[s,k] W[e[s,k]] over the leading (expert) dim of `weight_EX`.

    Written by hand because plain indexing (`weight_EX[ids]`) makes autograd zero-fill a full
    E-sized gradient per gathered expert; here only the chosen experts' gradient rows are
    written (g * dW_s), the others stay the zeros of a fresh buffer (`moe.memory`), and the gate
    gradient is one dot product <dW_s, W_e> per chosen expert.
    """

    @staticmethod
    def forward(ctx, weight_EX: Tensor, gates_SK: Tensor, ids: list[list[int]]) -> Tensor:
        gates_SK = gates_SK.to(weight_EX.dtype)
        out_SX = weight_EX.new_empty((len(ids),) + tuple(weight_EX.shape[1:]))
        for s, row in enumerate(ids):
            # Accumulate k in order (g_1 W_1 + g_2 W_2 ...), as the release does.
            torch.mul(weight_EX[row[0]], gates_SK[s, 0], out=out_SX[s])
            for k in range(1, len(row)):
                out_SX[s].addcmul_(weight_EX[row[k]], gates_SK[s, k])
        ctx.ids = ids
        ctx.save_for_backward(weight_EX, gates_SK)
        return out_SX

    @staticmethod
    def backward(ctx, grad_SX: Tensor):
        weight_EX, gates_SK = ctx.saved_tensors
        ids = ctx.ids
        grad_weight = grad_gates = None
        if ctx.needs_input_grad[0]:
            grad_weight = empty_like_large(weight_EX, zero=True)  # unchosen experts: untouched zeros
            written: set[int] = set()
            for s, row in enumerate(ids):
                for k, e in enumerate(row):
                    if e in written:
                        grad_weight[e].addcmul_(grad_SX[s], gates_SK[s, k])
                    else:
                        torch.mul(grad_SX[s], gates_SK[s, k], out=grad_weight[e])
                        written.add(e)
        if ctx.needs_input_grad[1]:
            grad_gates = torch.stack(
                [
                    torch.stack(
                        [(grad_SX[s].reshape(-1).float() @ weight_EX[e].reshape(-1).float()) for e in row]
                    )
                    for s, row in enumerate(ids)
                ]
            )
        return grad_weight, grad_gates, None


def merge_expert_weights(
    weight_EOI: Tensor, bias_EO: Tensor | None, expert_ids_SK: Tensor, gates_SK: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Per segment s: W_s = sum_k g[s,k] W[e[s,k]] and b_s likewise."""
    ids = expert_ids_SK.tolist()  # S*K small ints; one host sync per call
    weight_SOI = _MergeExperts.apply(weight_EOI, gates_SK, ids)
    bias_SO = None if bias_EO is None else _MergeExperts.apply(bias_EO, gates_SK, ids)
    return weight_SOI, bias_SO


def merge_expert_weights_static(
    weight_EOI: Tensor, bias_EO: Tensor | None, expert_ids_SK: Tensor, gates_SK: Tensor
) -> tuple[Tensor, Tensor | None]:
    """`merge_expert_weights` without reading the expert ids on the host (the static execution
    path: GPU, torch.compile): gathers of the chosen experts, accumulated over k in order with
    the same multiply-adds. Autograd's gradient of the gather is E-sized, which on a GPU costs
    less than the host round trip it saves."""

    def merge(w_EX: Tensor) -> Tensor:
        g_SK = gates_SK.to(w_EX.dtype)
        shape = (-1,) + (1,) * (w_EX.dim() - 1)
        out_SX = w_EX.index_select(0, expert_ids_SK[:, 0]) * g_SK[:, 0].view(shape)
        for k in range(1, expert_ids_SK.shape[1]):
            out_SX = torch.addcmul(out_SX, w_EX.index_select(0, expert_ids_SK[:, k]), g_SK[:, k].view(shape))
        return out_SX

    return merge(weight_EOI), None if bias_EO is None else merge(bias_EO)


def segment_linear(
    x_BLI: Tensor,
    weight_SOI: Tensor,
    bias_SO: Tensor | None,
    segment_starts: tuple[int, ...],
    out_slice: slice | None = None,
    cpu_kernels: bool = True,
) -> Tensor:
    """Apply segment s's linear to positions [segment_starts[s], segment_starts[s+1]).

    `out_slice` keeps only some output rows of every merged weight (caption decoding computes
    the query part or the key/value part of a fused qkv projection). `cpu_kernels=False` uses
    F.linear throughout (the static path; `moe.kernels` only helps fp32 on CPU).
    """
    lin = linear if cpu_kernels else F.linear
    if out_slice is not None:
        weight_SOI = weight_SOI[:, out_slice]
        bias_SO = None if bias_SO is None else bias_SO[:, out_slice]
    num_segments = len(segment_starts)
    if weight_SOI.shape[0] != num_segments:
        raise ValueError(
            f"{weight_SOI.shape[0]} routing rows for {num_segments} segments {segment_starts}"
        )
    if num_segments == 1:
        return lin(x_BLI, weight_SOI[0], None if bias_SO is None else bias_SO[0])
    length = x_BLI.shape[1]
    if segment_starts[-1] >= length:
        raise ValueError(f"segment_starts {segment_starts} do not fit a sequence of {length}")
    bounds = list(segment_starts) + [length]
    pieces = [
        lin(
            x_BLI[:, bounds[s] : bounds[s + 1]],
            weight_SOI[s],
            None if bias_SO is None else bias_SO[s],
        )
        for s in range(num_segments)
    ]
    return torch.cat(pieces, dim=1)
