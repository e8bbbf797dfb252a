"""Routers: what decides which experts a token (or a whole segment) uses.

Shape legend (suffixes on tensor names):
  B batch, L sequence length, T tokens (B*L flattened), D model width,
  S segments of a sequence (one attribute/task/modality row each), A attribute width,
  E experts, K experts chosen per token or segment (top_k).

Data-independent routers (attribute, task, modality) look only at per-segment ids or attribute
rows: every token of a segment shares one decision, which `moe.merge` turns into one merged
linear per segment. Their input travels in a `RoutingContext` built by the caller for each
forward; nothing is kept in module globals.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig


@dataclass
class RoutingContext:
    """Everything a router may need besides the token features, passed per forward.

    `segment_starts[s]` is the first sequence position of segment s; segment s spans
    [segment_starts[s], segment_starts[s + 1]) and the last one runs to the end. Row s of
    `attributes_SA` / `task_ids_S` / `modality_ids_S` describes segment s.
    """

    segment_starts: tuple[int, ...] = (0,)
    attributes_SA: Tensor | None = None
    task_ids_S: Tensor | None = None
    modality_ids_S: Tensor | None = None
    padding_mask_BL: Tensor | None = None  # True = padding

    def __post_init__(self) -> None:
        if not self.segment_starts or self.segment_starts[0] != 0:
            raise ValueError(f"segment_starts must begin with 0, got {self.segment_starts}")
        if any(b <= a for a, b in zip(self.segment_starts, self.segment_starts[1:])):
            raise ValueError(f"segment_starts must increase, got {self.segment_starts}")

    @property
    def num_segments(self) -> int:
        return len(self.segment_starts)

    def select_segments(self, rows: list[int], segment_starts: tuple[int, ...]) -> RoutingContext:
        """The context of a sequence made of some of this one's segments (e.g. caption decoding
        feeds only text tokens, which must be routed with the text row)."""
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rows]

        return RoutingContext(
            segment_starts=segment_starts,
            attributes_SA=pick(self.attributes_SA),
            task_ids_S=pick(self.task_ids_S),
            modality_ids_S=pick(self.modality_ids_S),
        )


@dataclass
class SegmentDecision:
    """A data-independent routing decision: top-k experts and gate values per segment."""

    expert_ids_SK: Tensor
    gates_SK: Tensor  # fp32, sums to 1 over K when K > 1
    logits_SE: Tensor  # the (noisy, in training) router logits
    aux: dict[str, Tensor] = field(default_factory=dict)


def topk_gating(logits_XE: Tensor, top_k: int, gate_order: str) -> tuple[Tensor, Tensor]:
    """Pick top-k experts per row of logits and their gate values (fp32).

    softmax_topk (the release): softmax over all E, keep the k largest, renormalise them to sum
    to 1. With k == 1 the renormalised gate would be the constant 1 and the router would get no
    gradient, so top-1 keeps the raw probability (Switch Transformer).
    topk_softmax: softmax over the k largest logits only.
    """
    logits_XE = logits_XE.float()
    top_logits_XK, expert_ids_XK = torch.topk(logits_XE, top_k, dim=-1)
    if gate_order == "topk_softmax":
        return expert_ids_XK, torch.softmax(top_logits_XK, dim=-1)
    probs_XE = torch.softmax(logits_XE, dim=-1)
    gates_XK = probs_XE.gather(-1, expert_ids_XK)
    if top_k > 1:
        gates_XK = gates_XK / gates_XK.sum(dim=-1, keepdim=True)
    return expert_ids_XK, gates_XK


class _SegmentRouter(nn.Module):
    """Shared tail of the data-independent routers: a per-segment embedding h_SD, then
    wg (D -> E, no bias), optional Gaussian logit noise in training, top-k gating."""

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wg = nn.Linear(d_model, cfg.num_experts, bias=False)

    def embed(self, ctx: RoutingContext) -> Tensor:
        raise NotImplementedError

    def forward(self, ctx: RoutingContext) -> SegmentDecision:
        # Gate math in fp32 even under autocast: tiny tensors, and bf16/fp16 logits flip top-k.
        with torch.autocast(device_type=self.wg.weight.device.type, enabled=False):
            h_SD = self.embed(ctx).float()
            logits_SE = F.linear(h_SD, self.wg.weight.float())
            if self.training and self.cfg.noise == "gaussian" and self.cfg.noise_std > 0:
                # One draw per segment per forward, shared by all its tokens (the release's "vmoe").
                std = self.cfg.noise_std / self.cfg.num_experts
                logits_SE = logits_SE + torch.randn_like(logits_SE) * std
            expert_ids_SK, gates_SK = topk_gating(logits_SE, self.cfg.top_k, self.cfg.gate_order)
        return SegmentDecision(expert_ids_SK, gates_SK, logits_SE)


class AttributeRouter(_SegmentRouter):
    """Gate on LayerNorm(Linear(attribute row)) (the released Uni-Perceiver-MoE router)."""

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__(d_model, cfg)
        # Index names 0/1 mirror the official `tag_transform.{0,1}` keys.
        self.tag_transform = nn.Sequential(
            nn.Linear(cfg.attribute_dim, d_model), nn.LayerNorm(d_model)
        )

    def embed(self, ctx: RoutingContext) -> Tensor:
        if ctx.attributes_SA is None:
            raise ValueError("attribute router needs RoutingContext.attributes_SA")
        attributes_SA = ctx.attributes_SA.to(self.tag_transform[0].weight.dtype)
        return self.tag_transform(attributes_SA)


class TaskRouter(_SegmentRouter):
    """Gate on a learned embedding of the task id (one decision per task)."""

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__(d_model, cfg)
        self.embedding = nn.Embedding(cfg.num_tasks, d_model)

    def embed(self, ctx: RoutingContext) -> Tensor:
        if ctx.task_ids_S is None:
            raise ValueError("task router needs RoutingContext.task_ids_S")
        return self.embedding(ctx.task_ids_S)


class ModalityRouter(_SegmentRouter):
    """Gate on a learned embedding of the segment's modality id."""

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__(d_model, cfg)
        self.embedding = nn.Embedding(cfg.num_modalities, d_model)

    def embed(self, ctx: RoutingContext) -> Tensor:
        if ctx.modality_ids_S is None:
            raise ValueError("modality router needs RoutingContext.modality_ids_S")
        return self.embedding(ctx.modality_ids_S)


SEGMENT_ROUTERS: dict[str, type[_SegmentRouter]] = {
    "attribute": AttributeRouter,
    "task": TaskRouter,
    "modality": ModalityRouter,
}


def build_router(d_model: int, cfg: MoEConfig) -> nn.Module:
    if cfg.router in SEGMENT_ROUTERS:
        return SEGMENT_ROUTERS[cfg.router](d_model, cfg)
    raise NotImplementedError(f"router {cfg.router!r} is not available yet")
