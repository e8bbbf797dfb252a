"""Routers: what decides which experts a token (or a whole segment) uses.

Shape legend (suffixes on tensor names):
  B batch, L sequence length, T tokens (B*L flattened), D model width,
  S segments of a sequence (one attribute/task/modality row each), A attribute width,
  E experts, K experts chosen per token or segment (top_k).

Data-independent routers (attribute, task, modality) look only at per-segment ids or attribute
rows: every token of a segment shares one decision (`SegmentDecision`), which `moe.merge` turns
into one merged linear per segment. Token routers (token, context) look at each token's features
and return a `TokenGating` that the layer turns into a `TokenDecision` (gating + dispatch plan +
losses + stats). Router inputs travel in a `RoutingContext` built by the caller for each forward;
nothing is kept in module globals.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig
from .dispatch import DispatchPlan
from .losses import RouterLosses, router_losses
from .stats import RoutingStats


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
    # Inference only, owned by the caller for one generation (caption decoding): layers with
    # segment routing store (decision, merged weight, merged bias) here, keyed by the layer, on
    # first use and reuse them for every later call with this context, so the experts are merged
    # once per generation instead of once per token. Pass a fresh dict per generation (and per
    # weight update); ignored while autograd records.
    merged_cache: dict | None = None
    # Several sequences laid out as one row of tokens (B = 1, a joint call over sequence groups):
    # the sequence number of every token, and how many sequences there are. Routers that look
    # at a whole sequence (the context router's pooling) pool per sequence, not over the row.
    sequence_ids_T: Tensor | None = None
    num_sequences: int = 0

    def __post_init__(self) -> None:
        if not self.segment_starts or self.segment_starts[0] != 0:
            raise ValueError(f"segment_starts must begin with 0, got {self.segment_starts}")
        if any(b <= a for a, b in zip(self.segment_starts, self.segment_starts[1:])):
            raise ValueError(f"segment_starts must increase, got {self.segment_starts}")

    @property
    def num_segments(self) -> int:
        return len(self.segment_starts)

    def valid_tokens_T(self, batch: int, length: int) -> Tensor | None:
        """Flattened (B*L) True-for-real-token mask, or None when nothing is padded."""
        if self.padding_mask_BL is None:
            return None
        if tuple(self.padding_mask_BL.shape) != (batch, length):
            raise ValueError(
                f"padding_mask_BL has shape {tuple(self.padding_mask_BL.shape)}, the tokens "
                f"being routed are ({batch}, {length})"
            )
        return ~self.padding_mask_BL.reshape(-1).bool()  # on the mask's device (the caller's)

    def segment_index_L(self, length: int, device: torch.device) -> Tensor:
        """Segment number of every sequence position (for broadcasting segment decisions)."""
        if self.segment_starts[-1] >= length and self.num_segments > 1:
            raise ValueError(f"segment_starts {self.segment_starts} do not fit a sequence of {length}")
        # Built on the device from the (host) starts: no host-to-device copy, CUDA-graph safe.
        positions_L = torch.arange(length, device=device)
        seg_L = torch.zeros(length, dtype=torch.long, device=device)
        for start in self.segment_starts[1:]:
            seg_L += positions_L >= start
        return seg_L


class Decision:
    """What every routing decision offers, whatever its kind (segment or token): the chosen
    experts and their gates per routed row (a segment or a token), the router logits the choice
    was made on (None when not kept), the auxiliary losses and the dispatch stats (None when
    nothing was dispatched). Consumers (logging, aux losses) use only this interface."""

    losses: RouterLosses | None

    @property
    def expert_ids_NK(self) -> Tensor:
        raise NotImplementedError

    @property
    def gates_NK(self) -> Tensor:
        raise NotImplementedError

    @property
    def logits_NE(self) -> Tensor | None:
        raise NotImplementedError

    @property
    def routing_stats(self) -> RoutingStats | None:
        return None


@dataclass
class SegmentDecision(Decision):
    """A data-independent routing decision: top-k experts and gate values per segment.

    `losses` holds the load-balance and z-loss over the S segment rows (weights are the
    caller's; the release trains without them).
    """

    expert_ids_SK: Tensor
    gates_SK: Tensor  # fp32, sums to 1 over K when K > 1
    logits_SE: Tensor  # the (noisy, in training) router logits
    losses: RouterLosses | None = None

    @property
    def expert_ids_NK(self) -> Tensor:
        return self.expert_ids_SK

    @property
    def gates_NK(self) -> Tensor:
        return self.gates_SK

    @property
    def logits_NE(self) -> Tensor | None:
        return self.logits_SE


@dataclass
class TokenGating:
    """What a token router chose for each of T = B*L tokens (padding included, ignored later)."""

    expert_ids_TK: Tensor
    gates_TK: Tensor  # fp32
    logits_TE: Tensor  # fp32, the logits the choice was made on


@dataclass
class TokenDecision(Decision):
    """A per-token routing decision, ready to execute and to be reused by a sibling sublayer.

    `plan` says which token slots each expert computes (built once, reused by qkv -> attn-out and
    fc1 -> fc2); `losses` are the unweighted auxiliary losses over the real (unpadded) tokens;
    `stats` the per-expert counts, drop rate and imbalance.
    """

    expert_ids_TK: Tensor
    gates_TK: Tensor
    logits_TE: Tensor | None
    plan: DispatchPlan
    batch: int
    length: int
    losses: RouterLosses | None = None
    stats: RoutingStats | None = field(default=None)

    @property
    def expert_ids_NK(self) -> Tensor:
        return self.expert_ids_TK

    @property
    def gates_NK(self) -> Tensor:
        return self.gates_TK

    @property
    def logits_NE(self) -> Tensor | None:
        return self.logits_TE

    @property
    def routing_stats(self) -> RoutingStats | None:
        return self.stats


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


def _gaussian_noise(logits_XE: Tensor, cfg: MoEConfig, training: bool) -> Tensor:
    if training and cfg.noise == "gaussian" and cfg.noise_std > 0:
        std = cfg.noise_std / cfg.num_experts
        return logits_XE + torch.randn_like(logits_XE) * std
    return logits_XE


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
            # One draw per segment per forward, shared by all its tokens (the release's "vmoe").
            logits_SE = _gaussian_noise(logits_SE, self.cfg, self.training)
            expert_ids_SK, gates_SK = topk_gating(logits_SE, self.cfg.top_k, self.cfg.gate_order)
            # Aux losses only feed a backward pass: skip them (and their host syncs) in inference.
            losses = router_losses(logits_SE, expert_ids_SK[:, 0]) if torch.is_grad_enabled() else None
        return SegmentDecision(expert_ids_SK, gates_SK, logits_SE, losses)


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
        weight = self.tag_transform[0].weight
        return self.tag_transform(ctx.attributes_SA.to(device=weight.device, dtype=weight.dtype))


class _IdRouter(_SegmentRouter):
    """Gate on a learned embedding of one id per segment: `RoutingContext.<ids_field>`, fewer than
    `MoEConfig.<count_field>`."""

    kind: str  # for the error message
    ids_field: str
    count_field: str

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__(d_model, cfg)
        self.embedding = nn.Embedding(getattr(cfg, self.count_field), d_model)

    def embed(self, ctx: RoutingContext) -> Tensor:
        ids_S = getattr(ctx, self.ids_field)
        if ids_S is None:
            raise ValueError(f"{self.kind} router needs RoutingContext.{self.ids_field}")
        return self.embedding(ids_S.to(self.embedding.weight.device))


class TaskRouter(_IdRouter):
    """Gate on a learned embedding of the task id (one decision per task)."""

    kind, ids_field, count_field = "task", "task_ids_S", "num_tasks"


class ModalityRouter(_IdRouter):
    """Gate on a learned embedding of the segment's modality id."""

    kind, ids_field, count_field = "modality", "modality_ids_S", "num_modalities"


class LookupRouter(nn.Module):
    """No parameters: segment s goes to the expert whose `cfg.lookup_rows` entry equals its
    attribute row, with gate 1 (what a per-task export of an attribute-routed model needs)."""

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("rows_EA", torch.tensor(cfg.lookup_rows, dtype=torch.float32), persistent=False)

    def forward(self, ctx: RoutingContext) -> SegmentDecision:
        if ctx.attributes_SA is None:
            raise ValueError("lookup router needs RoutingContext.attributes_SA")
        rows_SA = ctx.attributes_SA.to(device=self.rows_EA.device, dtype=torch.float32)
        match_SE = (rows_SA[:, None, :] == self.rows_EA[None]).all(-1)
        if not bool(match_SE.any(-1).all()):
            unknown = rows_SA[~match_SE.any(-1)][0].tolist()
            raise ValueError(f"attribute row {unknown} is not one this model was exported for "
                             f"({self.rows_EA.tolist()})")
        expert_ids_SK = match_SE.float().argmax(-1, keepdim=True)
        gates_SK = torch.ones(expert_ids_SK.shape, dtype=torch.float32, device=rows_SA.device)
        return SegmentDecision(expert_ids_SK, gates_SK, match_SE.float())


def uniform_expert_ids(num_tokens: int, cfg: MoEConfig, device: torch.device) -> Tensor:
    """Token t's k-th slot goes to expert (t*K + k) % E: a perfectly balanced assignment."""
    slots_TK = torch.arange(num_tokens * cfg.top_k, device=device).view(num_tokens, cfg.top_k)
    return slots_TK % cfg.num_experts


def gates_for(logits_TE: Tensor, expert_ids_TK: Tensor, cfg: MoEConfig) -> Tensor:
    """Gate values of given expert choices, with the same gate_order rules as `topk_gating`."""
    if cfg.gate_order == "topk_softmax":
        return torch.softmax(logits_TE.gather(-1, expert_ids_TK), dim=-1)
    gates_TK = torch.softmax(logits_TE, dim=-1).gather(-1, expert_ids_TK)
    if cfg.top_k > 1:
        gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
    return gates_TK


class _TokenRouterBase(nn.Module):
    """Shared tail of the token routers: fp32 logits, noise, top-k (or uniform) gating."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def logits(self, x_BLD: Tensor, ctx: RoutingContext) -> Tensor:
        raise NotImplementedError

    def _jitter(self, x: Tensor) -> Tensor:
        if self.training and self.cfg.noise == "jitter" and self.cfg.jitter_eps > 0:
            eps = self.cfg.jitter_eps
            return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        return x

    def forward(self, x_BLD: Tensor, ctx: RoutingContext) -> TokenGating:
        with torch.autocast(device_type=x_BLD.device.type, enabled=False):
            logits_TE = self.logits(x_BLD.float(), ctx).reshape(-1, self.cfg.num_experts)
            logits_TE = _gaussian_noise(logits_TE, self.cfg, self.training)
            if self.cfg.uniform_routing:
                expert_ids_TK = uniform_expert_ids(logits_TE.shape[0], self.cfg, logits_TE.device)
                gates_TK = gates_for(logits_TE, expert_ids_TK, self.cfg)
            else:
                expert_ids_TK, gates_TK = topk_gating(logits_TE, self.cfg.top_k, self.cfg.gate_order)
        return TokenGating(expert_ids_TK, gates_TK, logits_TE)


class TokenRouter(_TokenRouterBase):
    """Gate on each token's own features: logits = wg(x_t) (GShard / Switch)."""

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        self.wg = nn.Linear(d_model, cfg.num_experts, bias=False)

    def logits(self, x_BLD: Tensor, ctx: RoutingContext) -> Tensor:
        return F.linear(self._jitter(x_BLD), self.wg.weight.float())


class ContextRouter(_TokenRouterBase):
    """Gate on concat(x_t, attention-pooled sequence): logits = wg([x_t ; pool(x)]).

    pool(x) = sum_l softmax_l(x_l . q / sqrt(D)) x_l with a learned query q, padding excluded.
    `wg` is one Linear(2D -> E); it is applied as wg[:, :D] x_t + wg[:, D:] pool(x), which
    equals the concatenation without materialising it.
    """

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        self.pool_query = nn.Parameter(torch.zeros(d_model))
        self.wg = nn.Linear(2 * d_model, cfg.num_experts, bias=False)

    def logits(self, x_BLD: Tensor, ctx: RoutingContext) -> Tensor:
        x_BLD = self._jitter(x_BLD)
        if ctx.sequence_ids_T is not None:
            return self._logits_flat(x_BLD, ctx)
        batch, length, d_model = x_BLD.shape
        scores_BL = (x_BLD @ self.pool_query.float()) / d_model**0.5
        valid_T = ctx.valid_tokens_T(batch, length)
        if valid_T is not None:
            valid_T = valid_T.to(x_BLD.device)
            scores_BL = scores_BL.masked_fill(~valid_T.view(batch, length), float("-inf"))
        weights_BL = torch.softmax(scores_BL, dim=-1).nan_to_num(0.0)  # all-padding rows -> 0
        pooled_BD = torch.einsum("bl,bld->bd", weights_BL, x_BLD)
        wg_ED = self.wg.weight.float()
        tok_BLE = F.linear(x_BLD, wg_ED[:, :d_model])
        ctx_BE = F.linear(pooled_BD, wg_ED[:, d_model:])
        return tok_BLE + ctx_BE[:, None, :]

    def _logits_flat(self, x_1TD: Tensor, ctx: RoutingContext) -> Tensor:
        """The same pooling over N sequences laid out as one row: a softmax per sequence."""
        x_TD = x_1TD.reshape(-1, x_1TD.shape[-1])
        d_model, n = x_TD.shape[-1], ctx.num_sequences
        seq_T = ctx.sequence_ids_T.to(x_TD.device)
        scores_T = (x_TD @ self.pool_query.float()) / d_model**0.5
        valid_T = ctx.valid_tokens_T(1, x_TD.shape[0])
        if valid_T is not None:
            scores_T = scores_T.masked_fill(~valid_T.to(x_TD.device), float("-inf"))
        max_N = scores_T.new_full((n,), float("-inf")).scatter_reduce(0, seq_T, scores_T, "amax")
        exp_T = (scores_T - max_N[seq_T]).exp().nan_to_num(0.0)  # all-padding sequences -> 0
        sum_N = exp_T.new_zeros(n).index_add(0, seq_T, exp_T)
        weights_T = (exp_T / sum_N[seq_T]).nan_to_num(0.0)
        pooled_ND = x_TD.new_zeros(n, d_model).index_add(0, seq_T, weights_T[:, None] * x_TD)
        wg_ED = self.wg.weight.float()
        tok_TE = F.linear(x_TD, wg_ED[:, :d_model])
        ctx_NE = F.linear(pooled_ND, wg_ED[:, d_model:])
        return (tok_TE + ctx_NE[seq_T]).view(x_1TD.shape[:-1] + (-1,))


SEGMENT_ROUTERS: dict[str, type[_SegmentRouter]] = {
    "attribute": AttributeRouter,
    "task": TaskRouter,
    "modality": ModalityRouter,
}
TOKEN_ROUTER_CLASSES: dict[str, type[_TokenRouterBase]] = {
    "token": TokenRouter,
    "context": ContextRouter,
}


def build_router(d_model: int, cfg: MoEConfig) -> nn.Module:
    if cfg.router == "lookup":
        return LookupRouter(d_model, cfg)
    if cfg.router in SEGMENT_ROUTERS:
        return SEGMENT_ROUTERS[cfg.router](d_model, cfg)
    if cfg.router in TOKEN_ROUTER_CLASSES:
        return TOKEN_ROUTER_CLASSES[cfg.router](d_model, cfg)
    raise ValueError(f"unknown router {cfg.router!r}")
