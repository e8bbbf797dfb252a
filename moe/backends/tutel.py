"""Tutel token dispatch: Tutel's fast encode/decode kernels and its all-to-all.

Shape legend: T tokens, E global experts, El local experts, P expert-parallel ranks,
C capacity slots per expert, I/O feature widths.

We hand Tutel our own plan (expert ids, locations within each expert, gates, capacity), so the
routing semantics (priority, drops, gate normalisation) are ours and identical to the torch
backend; Tutel moves the rows. Tutel computes every one of the E x C capacity slots (its
layout is padded). Dropless runs with C = the largest expert load, agreed across the group.
Tutel is imported lazily: it is an optional extra, not on PyPI.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import DispatchPlan
from ..experts import ExpertFn
from ..parallel import ExpertParallel
from ..static import StaticPlan


def run_dispatched(
    x_TI: Tensor,
    expert_ids_TK: Tensor,
    gates_TK: Tensor,
    plan: DispatchPlan | StaticPlan,
    expert_fn: ExpertFn,
    ep: ExpertParallel,
) -> Tensor:
    from tutel.impls import communicate, fast_dispatch

    num_experts, top_k = plan.num_experts, plan.top_k
    if isinstance(plan, StaticPlan):
        # Static shapes: C is the plan's buffer bound (no host sync in capacity mode); slots the
        # plan drops (capacity, padding) get index -1, which Tutel skips.
        capacity = plan.padded_rows()
        ids_TK = torch.where(plan.kept_TK, expert_ids_TK, -1).to(torch.int32)
        locations_TK = plan.locations_TK.to(torch.int32)
    else:
        capacity = plan.capacity
        if capacity is None:
            capacity = ep.max_over_group(plan.max_count)
        capacity = max(int(capacity), 1)
        ids_TK = expert_ids_TK.to(torch.int32)
        if plan.valid_T is not None:
            ids_TK = ids_TK.masked_fill(~plan.valid_T[:, None], -1)  # Tutel skips index -1
        locations_TK = plan.locations_TK
    critical = (
        num_experts,
        [ids_TK[:, k].contiguous() for k in range(top_k)],
        [locations_TK[:, k].contiguous() for k in range(top_k)],
        [gates_TK[:, k].to(x_TI.dtype).contiguous() for k in range(top_k)],
        capacity,
        None,
    )
    x_ECI = fast_dispatch.fast_encode(x_TI.contiguous(), critical)
    if ep.enabled:
        # [dest rank][local expert][C] -> after the exchange [source rank][local expert][C].
        x_PLCI = communicate.all_to_all_single(x_ECI.contiguous(), group=ep.group)
        x_PLCI = x_PLCI.view(ep.size, ep.num_local, capacity, -1)
        x_LPCI = x_PLCI.transpose(0, 1).contiguous()
        y = expert_fn(x_LPCI.view(-1, x_LPCI.shape[-1]), [ep.size * capacity] * ep.num_local)
        y_LPCO = y.view(ep.num_local, ep.size, capacity, -1)
        y_PLCO = y_LPCO.transpose(0, 1).contiguous()
        y_ECO = communicate.all_to_all_single(y_PLCO, group=ep.group)
        y_ECO = y_ECO.view(num_experts * capacity, -1)
    else:
        y_ECO = expert_fn(x_ECI.view(num_experts * capacity, -1), [capacity] * num_experts)
    return fast_dispatch.fast_decode(y_ECO.contiguous(), critical)
