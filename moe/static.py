"""Device-resident token dispatch with static shapes: the GPU / torch.compile path.

Shape legend: T tokens (B*L, padding included), K top-k, N = K*T slots, E experts,
C buffer rows per expert (the static capacity bound), I/O/D/F feature widths.

The CPU path (`moe.dispatch.make_plan` + `moe.experts`) computes only the kept slots as
variable-size row blocks: it needs the per-expert counts on the host (one sync per plan) and
that is what makes it fast on CPU (plain matmuls, threaded experts). On a GPU every host
round trip stalls the launch queue, and under torch.compile a data-dependent shape is a graph
break, so this path keeps every shape static and every decision on the device:

- capacity mode: the per-expert buffer has C = `cfg.capacity(B*L)` rows (the bound for a batch
  without padding; the real capacity, which depends on how many tokens are real, is a device
  scalar that only masks). Rows are gathered into the padded (E, C) buffer and the experts run
  one batched matmul over it (`layout="padded"`), or, where `torch._grouped_mm` runs (CUDA,
  bf16/fp16, sm90+), the slots are sorted by expert with the kept ones first and one grouped
  GEMM computes the N slot rows (`layout="grouped"`; the tail of dropped slots rides with the
  last expert and is masked out). No host sync at all.
- dropless mode: the grouped layout needs no host value; the padded layout needs C = the
  largest expert load, read once per layer call (`StaticPlan.rows`, cached on the plan that
  fc1 and fc2 share): at most one sync per layer call.

Semantics (priority, drops, gates, padding) equal `make_plan`'s exactly; results equal the CPU
path's to float rounding (tests/moe/test_moe_static.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import slots_in_priority_order

Layout = Literal["padded", "grouped"]
StaticExpertFn = Callable[[Tensor, "StaticPlan", Layout], Tensor]


@dataclass
class StaticPlan:
    """One routing decision's slots in both static layouts (all tensors on the device)."""

    num_tokens: int
    num_experts: int
    top_k: int
    # Buffer rows per expert for the padded layout: the static capacity bound, or None in
    # dropless mode until `padded_rows()` reads the largest load (the one allowed sync).
    rows: int | None
    capacity: int | Tensor | None  # the effective limit (a device scalar when padding decides it)
    expert_ids_TK: Tensor  # the router's choices (long)
    kept_TK: Tensor  # bool: slot (t, k) is computed
    locations_TK: Tensor  # long: rank of slot (t, k) within its expert, in priority order
    routed_E: Tensor  # slots routed to each expert, before capacity
    kept_E: Tensor  # slots computed per expert
    valid_T: Tensor | None
    sorted_token_N: Tensor  # grouped layout: token of each row (kept slots first, by expert)
    expert_of_row_N: Tensor  # grouped layout: expert whose weights row n uses
    row_of_TK: Tensor  # grouped layout: row of slot (t, k)
    offsets_E: Tensor  # grouped layout: int32 end row of each expert's block (last = N)

    def padded_rows(self) -> int:
        """C for the padded layout. Dropless: the largest expert load, ONE host sync per layer
        call (the plan is shared by fc1/fc2 and qkv/attn-out, so it is read once)."""
        if self.rows is None:
            self.rows = max(1, int(self.kept_E.max()))
        return self.rows


def capacity_on_device(n_real: Tensor, capacity_factor: float, top_k: int, num_experts: int,
                       min_capacity: int) -> Tensor:
    """`MoEConfig.capacity` on a device token count: max(min, ceil(cf * n * k / E)), evaluated
    in float64 in the same order as the host formula, so both give the same integer."""
    slots = torch.ceil(n_real.to(torch.float64) * capacity_factor * top_k / num_experts)
    return torch.clamp(slots, min=min_capacity).to(torch.long)


def grouped_mm_usable(device: torch.device, dtype: torch.dtype, *weights: Tensor) -> bool:
    """Whether `torch._grouped_mm` runs products in `dtype` with these weights: CUDA with sm90+
    (its kernels are Hopper's), bf16/fp16 operands, widths multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or device.type != "cuda":
        return False
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    align = 16 * 8 // torch.finfo(dtype).bits  # elements per 16 bytes
    return all(w.shape[-1] % align == 0 and w.shape[-2] % align == 0 for w in weights)


def make_static_plan(
    expert_ids_TK: Tensor,
    num_experts: int,
    rows: int | None,
    capacity: int | Tensor | None,
    valid_T: Tensor | None = None,
    priority_T: Tensor | None = None,
) -> StaticPlan:
    """`make_plan`'s decision (same priority, same drops) without a single host value.

    `rows`: the padded buffer's rows per expert (>= every value `capacity` can take), None in
    dropless mode. `capacity`: the limit, an int or a device scalar; None = dropless.
    Both layouts' indices are built (a few small integer ops), so every sublayer sharing the
    plan picks its own layout (`grouped_mm_usable` depends on its weights' widths).
    """
    num_tokens, top_k = expert_ids_TK.shape
    device = expert_ids_TK.device
    num_slots = num_tokens * top_k
    ids_N, order_T = slots_in_priority_order(expert_ids_TK, num_experts, valid_T, priority_T)
    sorted_N = torch.argsort(ids_N, stable=True)
    sorted_ids_N = ids_N.index_select(0, sorted_N)
    # A bincount whose size does not depend on the data (torch.bincount's does).
    routed_E1 = torch.zeros(num_experts + 1, dtype=torch.long, device=device).scatter_add_(
        0, ids_N, torch.ones_like(ids_N))
    start_E1 = torch.cumsum(routed_E1, 0) - routed_E1
    rank_sorted_N = torch.arange(num_slots, device=device) - start_E1.index_select(0, sorted_ids_N)
    keep_sorted_N = sorted_ids_N < num_experts
    if capacity is not None:
        keep_sorted_N = keep_sorted_N & (rank_sorted_N < capacity)
    # Back to priority order, then to (T, K).
    rank_N = torch.empty_like(rank_sorted_N).scatter_(0, sorted_N, rank_sorted_N)
    keep_N = torch.empty_like(keep_sorted_N).scatter_(0, sorted_N, keep_sorted_N)
    rank_KT, keep_KT = rank_N.view(top_k, num_tokens), keep_N.view(top_k, num_tokens)
    if order_T is not None:
        rank_KT = torch.empty_like(rank_KT).index_copy_(1, order_T, rank_KT)
        keep_KT = torch.empty_like(keep_KT).index_copy_(1, order_T, keep_KT)
    kept_TK, locations_TK = keep_KT.t().contiguous(), rank_KT.t().contiguous()
    routed_E = routed_E1[:num_experts]
    kept_E = routed_E if capacity is None else torch.clamp(routed_E, max=capacity)

    # Grouped layout: slots in (t, k) order keyed by expert, dropped slots keyed E (last). Rows
    # are independent, so only the block boundaries must match the kept counts.
    ids_flat = expert_ids_TK.reshape(-1)
    key_N = torch.where(kept_TK.reshape(-1), ids_flat, num_experts)
    row_order_N = torch.argsort(key_N, stable=True)
    sorted_token_N = torch.div(row_order_N, top_k, rounding_mode="floor")
    expert_of_row_N = torch.clamp(key_N.index_select(0, row_order_N), max=num_experts - 1)
    row_of_N = torch.empty_like(row_order_N).scatter_(
        0, row_order_N, torch.arange(num_slots, device=device))
    offsets_E = torch.cumsum(kept_E, 0).to(torch.int32)
    offsets_E = torch.cat([offsets_E[:-1], offsets_E.new_full((1,), num_slots)])  # tail rides with E-1
    return StaticPlan(
        num_tokens=num_tokens, num_experts=num_experts, top_k=top_k, rows=rows, capacity=capacity,
        expert_ids_TK=expert_ids_TK, kept_TK=kept_TK, locations_TK=locations_TK,
        routed_E=routed_E, kept_E=kept_E, valid_T=valid_T, sorted_token_N=sorted_token_N,
        expert_of_row_N=expert_of_row_N, row_of_TK=row_of_N.view(num_tokens, top_k), offsets_E=offsets_E,
    )


# --- gather / combine --------------------------------------------------------------------------

def _padded_dest_TK(plan: StaticPlan, rows: int) -> Tensor:
    """Flat row e * C + location of every slot (0 for slots that are not kept)."""
    dest_TK = plan.expert_ids_TK * rows + plan.locations_TK
    return torch.where(plan.kept_TK, dest_TK, 0)


def gather_padded(x_TI: Tensor, plan: StaticPlan) -> Tensor:
    """The (E, C, I) buffer: row (e, c) holds the token of expert e's c-th kept slot, zeros past
    the expert's load."""
    rows = plan.padded_rows()
    num_rows = plan.num_experts * rows
    dest_N = torch.where(plan.kept_TK, plan.expert_ids_TK * rows + plan.locations_TK, num_rows).reshape(-1)
    token_N = torch.arange(plan.num_tokens, device=x_TI.device).repeat_interleave(plan.top_k)
    # Slot -> buffer row as a map buffer row -> token (T = a zero row); slots that are not kept
    # all land on the extra row num_rows, which is cut off.
    token_of_R = torch.full((num_rows + 1,), plan.num_tokens, dtype=torch.long, device=x_TI.device)
    token_of_R = token_of_R.scatter(0, dest_N, token_N)[:num_rows]
    x_pad_TI = torch.cat([x_TI, x_TI.new_zeros(1, x_TI.shape[1])])
    return x_pad_TI.index_select(0, token_of_R).view(plan.num_experts, rows, x_TI.shape[1])


def gather_grouped(x_TI: Tensor, plan: StaticPlan) -> Tensor:
    """The N slot rows sorted by expert, kept slots first (N x I)."""
    return x_TI.index_select(0, plan.sorted_token_N)


def combine(y_RO: Tensor, gates_TK: Tensor, plan: StaticPlan, layout: Layout) -> Tensor:
    """out[t] = sum over kept slots k of gate[t, k] * y[row of (t, k)] (rows of either layout)."""
    if layout == "grouped":
        row_TK = plan.row_of_TK
    else:
        row_TK = _padded_dest_TK(plan, plan.padded_rows())
        y_RO = y_RO.reshape(-1, y_RO.shape[-1])
    weights_TK = gates_TK.to(y_RO.dtype) * plan.kept_TK.to(y_RO.dtype)
    out_TO = None
    for k in range(plan.top_k):  # k in order, as the CPU path accumulates
        part_TO = y_RO.index_select(0, row_TK[:, k]) * weights_TK[:, k, None]
        out_TO = part_TO if out_TO is None else out_TO + part_TO
    return out_TO


# --- expert products on the static layouts ------------------------------------------------------

def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype products on `x` run in: autocast's when it is on (as F.linear's), else x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def static_linear(x: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, plan: StaticPlan,
                  layout: Layout, out_slice: slice | None = None) -> Tensor:
    """Every expert's linear on its rows: (E, C, I) -> (E, C, O) padded, (N, I) -> (N, O) grouped.

    Under autocast the products run in the autocast dtype, as F.linear's would."""
    if out_slice is not None:
        weight_EOI = weight_EOI[:, out_slice]
        bias_EO = None if bias_EO is None else bias_EO[:, out_slice]
    dtype = compute_dtype(x)
    x, weight_EOI = x.to(dtype), weight_EOI.to(dtype)
    bias_EO = None if bias_EO is None else bias_EO.to(dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        if layout == "grouped":
            y_NO = torch._grouped_mm(x, weight_EOI.transpose(1, 2), offs=plan.offsets_E)
            if bias_EO is not None:
                y_NO = y_NO + bias_EO.index_select(0, plan.expert_of_row_N)
            return y_NO
        if bias_EO is None:
            return torch.bmm(x, weight_EOI.transpose(1, 2))
        return torch.baddbmm(bias_EO[:, None, :], x, weight_EOI.transpose(1, 2))


def static_ffn(x: Tensor, w1_EFD: Tensor, b1_EF: Tensor | None, w2_EDF: Tensor, b2_ED: Tensor | None,
               plan: StaticPlan, layout: Layout, activation: str) -> Tensor:
    """Whole-FFN experts on a static layout: fc1, activation, fc2 per expert."""
    act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[activation]
    return static_linear(act(static_linear(x, w1_EFD, b1_EF, plan, layout)), w2_EDF, b2_ED, plan, layout)


def run_static(x_TI: Tensor, gates_TK: Tensor, plan: StaticPlan, experts: StaticExpertFn,
               layout: Layout) -> Tensor:
    """Gather into `layout`, run `experts(buffer, plan, layout)`, combine (native torch backend)."""
    x = gather_grouped(x_TI, plan) if layout == "grouped" else gather_padded(x_TI, plan)
    return combine(experts(x, plan, layout), gates_TK, plan, layout)
