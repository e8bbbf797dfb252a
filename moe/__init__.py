"""Conditional Mixture-of-Experts layers (standalone: imports nothing from `uniperceiver`).

Module map: config (MoEConfig) -> routers (who decides) -> dispatch (plans) / merge (merged
weights) -> experts (row-block compute) -> backends (torch, tutel) -> layer (MoELinear, MoEFFN);
losses and stats are returned on decisions; parallel (expert parallelism, DDP helpers).
Checkpoints of sharded experts are the trainer's distributed checkpoints
(torch.distributed.checkpoint reshards them), not this package's business.
"""
from .config import DATA_INDEPENDENT_ROUTERS, TOKEN_ROUTERS, MoEConfig
from .dispatch import DispatchPlan, make_plan
from .layer import MoEFFN, MoELinear, routed_ffn
from .losses import RouterLosses, load_balance_loss, router_z_loss, weighted_aux_loss
from .merge import merge_expert_weights, segment_linear
from .routers import (
    AttributeRouter,
    ContextRouter,
    Decision,
    ModalityRouter,
    RoutingContext,
    SegmentDecision,
    TaskRouter,
    TokenDecision,
    TokenGating,
    TokenRouter,
    build_router,
    topk_gating,
)
from .stats import RoutingStats

__all__ = [
    "DATA_INDEPENDENT_ROUTERS",
    "TOKEN_ROUTERS",
    "AttributeRouter",
    "ContextRouter",
    "Decision",
    "DispatchPlan",
    "MoEConfig",
    "MoEFFN",
    "MoELinear",
    "ModalityRouter",
    "RouterLosses",
    "RoutingContext",
    "RoutingStats",
    "SegmentDecision",
    "TaskRouter",
    "TokenDecision",
    "TokenGating",
    "TokenRouter",
    "build_router",
    "load_balance_loss",
    "make_plan",
    "merge_expert_weights",
    "routed_ffn",
    "router_z_loss",
    "segment_linear",
    "topk_gating",
    "weighted_aux_loss",
]
