"""Conditional Mixture-of-Experts layers (standalone: imports nothing from `uniperceiver`)."""
from .config import DATA_INDEPENDENT_ROUTERS, MoEConfig
from .layer import MoELinear
from .merge import merge_expert_weights, segment_linear
from .routers import (
    AttributeRouter,
    ModalityRouter,
    RoutingContext,
    SegmentDecision,
    TaskRouter,
    build_router,
    topk_gating,
)

__all__ = [
    "DATA_INDEPENDENT_ROUTERS",
    "AttributeRouter",
    "MoEConfig",
    "MoELinear",
    "ModalityRouter",
    "RoutingContext",
    "SegmentDecision",
    "TaskRouter",
    "build_router",
    "merge_expert_weights",
    "segment_linear",
    "topk_gating",
]
