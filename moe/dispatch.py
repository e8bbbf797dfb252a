"""Token dispatch plans: which token slots each expert computes, and the gather/combine around them.

Shape legend: T tokens (B*L flattened, padding included), D/I/O feature widths, E experts,
K top-k slots per token, N = K*T slots, M kept slots (N minus padding minus capacity drops).

A plan sorts the kept slots by expert (stably, so within an expert they stay in priority order)
so that every expert's rows form one contiguous block: experts then run plain matmuls on
row blocks, and only kept slots are ever computed (capacity decides which slots are DROPPED,
never how many padded rows to compute). The plan is built once per routing decision and reused
by sibling sublayers (qkv -> attn-out, fc1 -> fc2).

Priority (who is dropped when an expert overflows), as in GShard: every token's first choice
before any token's second choice; within one choice rank, by position, or (batch-prioritized
routing, V-MoE) by the token's top-1 gate, highest first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DispatchPlan:
    """Kept slots grouped by expert, plus the per-slot locations Tutel-style kernels want."""

    num_tokens: int
    num_experts: int
    top_k: int
    capacity: int | None  # None = dropless
    token_idx_M: Tensor  # token of each kept slot, grouped by expert
    slot_idx_M: Tensor  # flat index t*K + k of each kept slot (picks its gate)
    counts: list[int]  # kept slots per expert (block sizes of token_idx_M)
    routed_E: Tensor  # slots routed to each expert, before capacity
    locations_TK: Tensor  # int32 rank of the slot within its expert (>= capacity: dropped)
    valid_T: Tensor | None  # False for padding (never routed)
    slot_of_TK: Tensor  # row m of slot (t, k) among the kept slots (0 where not kept)
    kept_TK: Tensor  # bool: slot (t, k) is computed

    @property
    def num_kept(self) -> int:
        return int(self.token_idx_M.shape[0])

    @property
    def all_kept(self) -> bool:
        return self.num_kept == self.kept_TK.numel()

    @property
    def max_count(self) -> int:
        return int(self.routed_E.max()) if self.routed_E.numel() else 0


def slots_in_priority_order(
    expert_ids_TK: Tensor, num_experts: int, valid_T: Tensor | None, priority_T: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """The expert id of every slot j = k * T + i in priority order (i: the token's rank within
    choice k; `priority_T`, higher first, else token order), and that token order (None: as
    given). Padding gets the sentinel expert E: sorted last, never counted, never kept. No host
    values (the static plan builds on it too)."""
    top_k = expert_ids_TK.shape[1]
    order_T = None
    if priority_T is not None:
        order_T = torch.argsort(priority_T, descending=True, stable=True)
    ids_KT = expert_ids_TK.t()
    if order_T is not None:
        ids_KT = ids_KT.index_select(1, order_T)
    if valid_T is not None:
        valid_KT = valid_T if order_T is None else valid_T.index_select(0, order_T)
        ids_KT = torch.where(valid_KT.expand(top_k, -1), ids_KT, num_experts)
    return ids_KT.reshape(-1), order_T


def make_plan(
    expert_ids_TK: Tensor,
    num_experts: int,
    capacity: int | None,
    valid_T: Tensor | None = None,
    priority_T: Tensor | None = None,
) -> DispatchPlan:
    """Build the dispatch plan of one routing decision.

    `priority_T` (batch-prioritized routing): higher values keep their slots first.
    """
    num_tokens, top_k = expert_ids_TK.shape
    device = expert_ids_TK.device
    num_slots = num_tokens * top_k
    ids_N, order_T = slots_in_priority_order(expert_ids_TK, num_experts, valid_T, priority_T)
    sorted_N = torch.argsort(ids_N, stable=True)
    sorted_ids_N = ids_N[sorted_N]
    routed_E1 = torch.bincount(ids_N, minlength=num_experts + 1)
    start_E1 = torch.cumsum(routed_E1, 0) - routed_E1
    rank_sorted_N = torch.arange(num_slots, device=device) - start_E1[sorted_ids_N]
    keep_sorted_N = sorted_ids_N < num_experts
    if capacity is not None:
        keep_sorted_N &= rank_sorted_N < capacity
    kept_M = sorted_N[keep_sorted_N]
    k_M = torch.div(kept_M, num_tokens, rounding_mode="floor")
    i_M = kept_M - k_M * num_tokens
    token_idx_M = i_M if order_T is None else order_T[i_M]
    routed_E = routed_E1[:num_experts]
    kept_E = routed_E if capacity is None else torch.clamp(routed_E, max=capacity)
    # Locations in (T, K) layout for padded-capacity kernels; padding keeps expert id -1 there.
    rank_N = torch.empty_like(rank_sorted_N)
    rank_N[sorted_N] = rank_sorted_N
    rank_KT = rank_N.view(top_k, num_tokens)
    if order_T is not None:
        unsorted_KT = torch.empty_like(rank_KT)
        unsorted_KT[:, order_T] = rank_KT
        rank_KT = unsorted_KT
    slot_idx_M = token_idx_M * top_k + k_M
    slot_of_N = torch.zeros(num_slots, dtype=torch.long, device=device)
    slot_of_N[slot_idx_M] = torch.arange(slot_idx_M.shape[0], device=device)
    kept_N = torch.zeros(num_slots, dtype=torch.bool, device=device)
    kept_N[slot_idx_M] = True
    return DispatchPlan(
        num_tokens=num_tokens,
        num_experts=num_experts,
        top_k=top_k,
        capacity=capacity,
        token_idx_M=token_idx_M,
        slot_idx_M=slot_idx_M,
        counts=kept_E.tolist(),
        routed_E=routed_E,
        locations_TK=rank_KT.t().to(torch.int32),
        valid_T=valid_T,
        slot_of_TK=slot_of_N.view(num_tokens, top_k),
        kept_TK=kept_N.view(num_tokens, top_k),
    )


def _sum_slots(rows_MO: Tensor, weights_TK: Tensor, plan: DispatchPlan) -> Tensor:
    """out[t] = sum over kept slots k of weights[t, k] * rows[slot_of[t, k]], with gathers only.

    Gathers parallelise well on CPU; `index_add_` (a scatter) runs row by row. A slot that was
    not kept points at row 0 with weight exactly 0.
    """
    num_tokens, top_k = plan.slot_of_TK.shape
    if rows_MO.shape[0] == 0:
        return rows_MO.new_zeros(num_tokens, rows_MO.shape[1])
    if not plan.all_kept:
        weights_TK = weights_TK * plan.kept_TK
    out_TO = None
    for k in range(top_k):
        part_TO = rows_MO.index_select(0, plan.slot_of_TK[:, k])
        if out_TO is None:
            out_TO = part_TO.mul_(weights_TK[:, k, None])
        else:
            out_TO.addcmul_(part_TO, weights_TK[:, k, None])
    return out_TO


class _Combine(torch.autograd.Function):
    """y_TO[t] = sum over kept slots (t, k): gate[t, k] * y_MO[slot_of[t, k]].

    Saves indices, never one-hot matrices: backward is one gather and one row-wise dot.
    """

    @staticmethod
    def forward(ctx, y_MO: Tensor, gates_TK: Tensor, plan: DispatchPlan) -> Tensor:
        ctx.plan = plan
        ctx.save_for_backward(y_MO, gates_TK)
        return _sum_slots(y_MO, gates_TK.to(y_MO.dtype), plan)

    @staticmethod
    def backward(ctx, grad_TO: Tensor):
        y_MO, gates_TK = ctx.saved_tensors
        plan = ctx.plan
        grad_MO = grad_TO.index_select(0, plan.token_idx_M)
        grad_y = grad_gates = None
        if ctx.needs_input_grad[1]:
            dots_M = torch.linalg.vecdot(grad_MO, y_MO).to(gates_TK.dtype)  # (a batched bmm is 3x slower on CPU)
            grad_gates = gates_TK.new_zeros(gates_TK.numel())
            grad_gates[plan.slot_idx_M] = dots_M
            grad_gates = grad_gates.view_as(gates_TK)
        if ctx.needs_input_grad[0]:
            gates_M = gates_TK.reshape(-1).index_select(0, plan.slot_idx_M)
            grad_y = grad_MO.mul_(gates_M.to(grad_MO.dtype)[:, None])
        return grad_y, grad_gates, None


class _Gather(torch.autograd.Function):
    """x_MI = x_TI[token_idx_M]; backward sums each token's slot gradients with gathers."""

    @staticmethod
    def forward(ctx, x_TI: Tensor, plan: DispatchPlan) -> Tensor:
        ctx.plan = plan
        return x_TI.index_select(0, plan.token_idx_M)

    @staticmethod
    def backward(ctx, grad_MI: Tensor):
        plan = ctx.plan
        ones_TK = plan.kept_TK.to(grad_MI.dtype)
        return _sum_slots(grad_MI.contiguous(), ones_TK, plan), None


def gather_slots(x_TI: Tensor, plan: DispatchPlan) -> Tensor:
    """Rows of the kept slots, grouped by expert (M x I)."""
    return _Gather.apply(x_TI, plan)


def combine_slots(y_MO: Tensor, gates_TK: Tensor, plan: DispatchPlan) -> Tensor:
    """Gate-weighted sum of every token's kept slots (dropped slots and padding give zeros)."""
    return _Combine.apply(y_MO, gates_TK, plan)
