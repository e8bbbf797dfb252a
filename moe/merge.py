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

from .kernels import linear, linear_new
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
        ctx.ids = ids
        ctx.save_for_backward(weight_EX, gates_SK)
        return _merge_rows(weight_EX, gates_SK, ids)

    @staticmethod
    def backward(ctx, grad_SX: Tensor):
        weight_EX, gates_SK = ctx.saved_tensors
        ids = ctx.ids
        grad_weight = empty_like_large(weight_EX, zero=True) if ctx.needs_input_grad[0] else None
        grad_gates = gates_SK.new_zeros(gates_SK.shape, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        written: set[int] = set()
        for s, row in enumerate(ids):
            _merge_backward_row(grad_SX[s], weight_EX, gates_SK, s, row, grad_weight, grad_gates, written)
        return grad_weight, grad_gates, None


def _merge_rows(weight_EX: Tensor, gates_SK: Tensor, ids: list[list[int]]) -> Tensor:
    """W_s = sum_k g[s,k] W[e[s,k]], accumulated over k in order (g_1 W_1 + g_2 W_2 ...), as
    the release does."""
    out_SX = weight_EX.new_empty((len(ids),) + tuple(weight_EX.shape[1:]))
    for s, row in enumerate(ids):
        torch.mul(weight_EX[row[0]], gates_SK[s, 0], out=out_SX[s])
        for k in range(1, len(row)):
            out_SX[s].addcmul_(weight_EX[row[k]], gates_SK[s, k])
    return out_SX


def _merge_backward_row(
    grad_X: Tensor,
    weight_EX: Tensor,
    gates_SK: Tensor,
    s: int,
    row: list[int],
    grad_weight_EX: Tensor | None,
    grad_gates_SK: Tensor | None,
    written: set[int],
    first_k: int = 0,
) -> None:
    """Segment s's share of the merge's backward, given dL/dW_s = `grad_X`: g[s,k] dW_s into
    the chosen experts' gradient rows (written or accumulated), and dL/dg[s,k] = <dW_s, W_e>.
    `row` holds the experts of k = first_k, first_k + 1, ..."""
    for k, e in enumerate(row, start=first_k):
        if grad_weight_EX is not None:
            if e in written:
                grad_weight_EX[e].addcmul_(grad_X, gates_SK[s, k])
            else:
                torch.mul(grad_X, gates_SK[s, k], out=grad_weight_EX[e])
                written.add(e)
        if grad_gates_SK is not None:
            grad_gates_SK[s, k] += _gate_grad(grad_X, weight_EX[e])


def _gate_grad(grad_X: Tensor, weight_X: Tensor) -> Tensor:
    """dL/dg for a merged expert: <dL/dW_s, W_e>, in float32."""
    return grad_X.reshape(-1).float() @ weight_X.reshape(-1).float()


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


def _segment_bounds(segment_starts: tuple[int, ...], num_rows: int, length: int) -> list[int]:
    """[start_0, ..., start_{S-1}, length], after checking one routing row per segment and that
    the segments fit the sequence (one segment always spans it)."""
    if num_rows != len(segment_starts):
        raise ValueError(f"{num_rows} routing rows for {len(segment_starts)} segments {segment_starts}")
    if len(segment_starts) > 1 and segment_starts[-1] >= length:
        raise ValueError(f"segment_starts {segment_starts} do not fit a sequence of {length}")
    return [*segment_starts, length]


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
    bounds = _segment_bounds(segment_starts, weight_SOI.shape[0], x_BLI.shape[1])
    num_segments = len(segment_starts)
    if num_segments == 1:
        return lin(x_BLI, weight_SOI[0], None if bias_SO is None else bias_SO[0])
    pieces = [
        lin(
            x_BLI[:, bounds[s] : bounds[s + 1]],
            weight_SOI[s],
            None if bias_SO is None else bias_SO[s],
        )
        for s in range(num_segments)
    ]
    return torch.cat(pieces, dim=1)


class _MergedSegmentLinear(torch.autograd.Function):
    """`merge_expert_weights` + `segment_linear` as one autograd node (training, eager).

    The same products as the two-step path, bit for bit, without what autograd adds between
    them: the per-segment select of the merged weight (its backward zero-fills an S-sized
    weight gradient per segment, then sums them), the per-segment slice of the input (a
    zero-filled input-sized gradient per segment) and the concatenation of the outputs. Here
    each segment's input gradient is written into its rows of one buffer, and its weight
    gradient dW_s goes straight into the chosen experts' rows and their gate gradients.
    """

    @staticmethod
    def forward(ctx, x_BLI: Tensor, gates_SK: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None,
                ids: list[list[int]], bounds: list[int]) -> Tensor:
        ctx.gates_dtype = gates_SK.dtype
        gates_SK = gates_SK.to(weight_EOI.dtype)
        weight_SOI = _merge_rows(weight_EOI, gates_SK, ids)
        bias_SO = None if bias_EO is None else _merge_rows(bias_EO, gates_SK, ids)
        batch, _, in_features = x_BLI.shape
        out_features = weight_EOI.shape[1]
        if len(ids) == 1:  # one segment: one product over all tokens, as segment_linear does
            y_BLO = linear_new(x_BLI.reshape(-1, in_features), weight_SOI[0], None if bias_SO is None else bias_SO[0])
            y_BLO = y_BLO.view(batch, -1, out_features)
        else:
            y_BLO = x_BLI.new_empty(batch, x_BLI.shape[1], out_features)
            for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
                x_MI = x_BLI[:, a:b].reshape(-1, in_features)
                y_BLO[:, a:b] = linear_new(x_MI, weight_SOI[s], None if bias_SO is None else bias_SO[s]).view(batch, b - a, -1)
        ctx.ids, ctx.bounds, ctx.has_bias = ids, bounds, bias_EO is not None
        ctx.save_for_backward(x_BLI, gates_SK, weight_EOI, weight_SOI, bias_EO)
        return y_BLO

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_BLO: Tensor):
        x_BLI, gates_SK, weight_EOI, weight_SOI, bias_EO = ctx.saved_tensors
        ids, bounds = ctx.ids, ctx.bounds
        need_x, need_g, need_w, need_b = ctx.needs_input_grad[:4]
        need_b = need_b and ctx.has_bias
        in_features, out_features = x_BLI.shape[-1], weight_EOI.shape[1]
        grad_BLO = grad_BLO.contiguous()
        grad_x_BLI = torch.empty_like(x_BLI, memory_format=torch.contiguous_format) if need_x else None
        grad_weight = empty_like_large(weight_EOI, zero=True) if need_w else None
        grad_bias = torch.zeros_like(bias_EO) if need_b else None
        # The weight's and the bias's shares of the gate gradient are summed in the gates' own
        # dtype, as autograd sums the two merges' float32 gate gradients of the two-step path.
        grad_gates = gates_SK.new_zeros(gates_SK.shape, dtype=torch.float32) if need_g else None
        grad_gates_b = gates_SK.new_zeros(gates_SK.shape, dtype=torch.float32) if need_g and ctx.has_bias else None
        written_w: set[int] = set()
        written_b: set[int] = set()
        for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
            if len(ids) == 1:
                x_MI, dy_MO = x_BLI.reshape(-1, in_features), grad_BLO.reshape(-1, out_features)
            else:
                x_MI = x_BLI[:, a:b].reshape(-1, in_features)
                dy_MO = grad_BLO[:, a:b].reshape(-1, out_features)
            if need_x:
                grad_x_BLI[:, a:b] = linear_new(dy_MO, weight_SOI[s].t()).view(x_BLI.shape[0], b - a, -1)
            row = ids[s]
            if need_w and row[0] not in written_w and row.count(row[0]) == 1:
                # dL/dW_s straight into the first chosen expert's (fresh) gradient row: the other
                # experts and the gates read it there, then it is scaled in place last.
                grad_OI = torch.mm(dy_MO.t(), x_MI, out=grad_weight[row[0]])
                _merge_backward_row(grad_OI, weight_EOI, gates_SK, s, row[1:], grad_weight, grad_gates, written_w, 1)
                if grad_gates is not None:
                    grad_gates[s, 0] += _gate_grad(grad_OI, weight_EOI[row[0]])
                grad_OI.mul_(gates_SK[s, 0])
                written_w.add(row[0])
            elif need_w or need_g:
                grad_OI = torch.mm(dy_MO.t(), x_MI)  # dL/dW_s, as the two-step path's linear computes it
                _merge_backward_row(grad_OI, weight_EOI, gates_SK, s, row, grad_weight, grad_gates, written_w)
            if ctx.has_bias and (need_b or need_g):
                _merge_backward_row(dy_MO.sum(0), bias_EO, gates_SK, s, ids[s], grad_bias, grad_gates_b, written_b)
        if grad_gates is not None:
            grad_gates = grad_gates.to(ctx.gates_dtype)
            if grad_gates_b is not None:
                grad_gates = grad_gates + grad_gates_b.to(ctx.gates_dtype)
        return grad_x_BLI, grad_gates, grad_weight, grad_bias, None, None


def merged_segment_linear(
    x_BLI: Tensor,
    weight_EOI: Tensor,
    bias_EO: Tensor | None,
    expert_ids_SK: Tensor,
    gates_SK: Tensor,
    segment_starts: tuple[int, ...],
) -> Tensor:
    """segment_linear(x, *merge_expert_weights(W, b, ids, g), segment_starts) with one autograd
    node (`_MergedSegmentLinear`); same values and gradients. Eager, un-autocast only."""
    bounds = _segment_bounds(segment_starts, expert_ids_SK.shape[0], x_BLI.shape[1])
    ids = expert_ids_SK.tolist()  # S*K small ints; one host sync per call
    return _MergedSegmentLinear.apply(x_BLI, gates_SK, weight_EOI, bias_EO, ids, bounds)
