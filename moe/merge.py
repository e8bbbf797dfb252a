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


def merge_expert_weights(
    weight_EOI: Tensor, bias_EO: Tensor | None, expert_ids_SK: Tensor, gates_SK: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Per segment s: W_s = sum_k g[s,k] W[e[s,k]] and b_s likewise."""
    gates_SK = gates_SK.to(weight_EOI.dtype)
    # Accumulate k in order (g_1 W_1 + g_2 W_2 ...), as the release does.
    weight_SOI = gates_SK[:, 0, None, None] * weight_EOI[expert_ids_SK[:, 0]]
    for k in range(1, expert_ids_SK.shape[1]):
        weight_SOI = weight_SOI + gates_SK[:, k, None, None] * weight_EOI[expert_ids_SK[:, k]]
    if bias_EO is None:
        return weight_SOI, None
    bias_SO = gates_SK[:, 0, None] * bias_EO[expert_ids_SK[:, 0]]
    for k in range(1, expert_ids_SK.shape[1]):
        bias_SO = bias_SO + gates_SK[:, k, None] * bias_EO[expert_ids_SK[:, k]]
    return weight_SOI, bias_SO


def segment_linear(
    x_BLI: Tensor,
    weight_SOI: Tensor,
    bias_SO: Tensor | None,
    segment_starts: tuple[int, ...],
    out_slice: slice | None = None,
) -> Tensor:
    """Apply segment s's linear to positions [segment_starts[s], segment_starts[s+1]).

    `out_slice` keeps only some output rows of every merged weight (caption decoding computes
    the query part or the key/value part of a fused qkv projection).
    """
    if out_slice is not None:
        weight_SOI = weight_SOI[:, out_slice]
        bias_SO = None if bias_SO is None else bias_SO[:, out_slice]
    num_segments = len(segment_starts)
    if weight_SOI.shape[0] != num_segments:
        raise ValueError(
            f"{weight_SOI.shape[0]} routing rows for {num_segments} segments {segment_starts}"
        )
    if num_segments == 1:
        return F.linear(x_BLI, weight_SOI[0], None if bias_SO is None else bias_SO[0])
    length = x_BLI.shape[1]
    if segment_starts[-1] >= length:
        raise ValueError(f"segment_starts {segment_starts} do not fit a sequence of {length}")
    bounds = list(segment_starts) + [length]
    pieces = [
        F.linear(
            x_BLI[:, bounds[s] : bounds[s + 1]],
            weight_SOI[s],
            None if bias_SO is None else bias_SO[s],
        )
        for s in range(num_segments)
    ]
    return torch.cat(pieces, dim=1)
