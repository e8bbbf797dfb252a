"""Native token dispatch: gather kept slots sorted by expert, run row blocks, combine.

Shape legend: T tokens, M kept slots, I/O feature widths.
Only kept slots are computed; nothing is padded to capacity.
"""
from __future__ import annotations

from torch import Tensor

from ..dispatch import DispatchPlan, combine_slots, gather_slots
from ..experts import ExpertFn
from ..parallel import ExpertParallel, run_experts_parallel


def run_dispatched(
    x_TI: Tensor,
    expert_ids_TK: Tensor,
    gates_TK: Tensor,
    plan: DispatchPlan,
    expert_fn: ExpertFn,
    ep: ExpertParallel,
) -> Tensor:
    del expert_ids_TK  # the backends' common signature; the plan's sorted slots already encode it
    x_MI = gather_slots(x_TI, plan)
    if ep.enabled:
        y_MO = run_experts_parallel(x_MI, plan.counts, ep, expert_fn)
    else:
        y_MO = expert_fn(x_MI, plan.counts)
    return combine_slots(y_MO, gates_TK, plan)
