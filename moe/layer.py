"""`MoELinear`: a linear layer whose weights are a routed choice among E expert copies.

Shape legend: B batch, L sequence, I in features, O out features, E experts, K top-k,
S segments.

A sibling sublayer may reuse this layer's decision (the release routes attention-out with the
qkv decision and fc2 with the fc1 decision): pass the returned decision back in as `decision`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import MoEConfig
from .merge import merge_expert_weights, segment_linear
from .routers import RoutingContext, SegmentDecision, build_router


class MoELinear(nn.Module):
    """E copies of nn.Linear(in_features, out_features) and (optionally) the router choosing them.

    `has_router=False` builds a layer that always receives a sibling's decision.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        cfg: MoEConfig | None = None,
        *,
        has_router: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else MoEConfig()
        self.in_features = in_features
        self.out_features = out_features
        num_experts = self.cfg.num_experts
        self.weight_EOI = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias_EO = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None
        self.router = build_router(in_features, self.cfg) if has_router else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert starts as an independent nn.Linear would.
        for e in range(self.cfg.num_experts):
            nn.init.kaiming_uniform_(self.weight_EOI[e], a=math.sqrt(5))
            if self.bias_EO is not None:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias_EO[e], -bound, bound)

    def route(self, ctx: RoutingContext) -> SegmentDecision:
        if self.router is None:
            raise RuntimeError("this MoELinear has no router: pass a sibling's decision")
        return self.router(ctx)

    def forward(
        self,
        x_BLI: Tensor,
        ctx: RoutingContext,
        decision: SegmentDecision | None = None,
        out_slice: slice | None = None,
    ) -> tuple[Tensor, SegmentDecision]:
        if decision is None:
            decision = self.route(ctx)
        if not self.cfg.data_independent:
            raise NotImplementedError(f"router {self.cfg.router!r} needs token dispatch")
        weight_SOI, bias_SO = merge_expert_weights(
            self.weight_EOI, self.bias_EO, decision.expert_ids_SK, decision.gates_SK
        )
        y_BLO = segment_linear(x_BLI, weight_SOI, bias_SO, ctx.segment_starts, out_slice)
        return y_BLO, decision

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.cfg.num_experts}, top_k={self.cfg.top_k}, "
            f"router={self.cfg.router if self.router is not None else 'shared'}"
        )
