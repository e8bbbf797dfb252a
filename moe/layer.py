"""MoE sublayers: `MoELinear` (one routed linear) and `MoEFFN` (a routed feed-forward block).

Shape legend: B batch, L sequence, T = B*L tokens, I in features, O out features, D model
width, F hidden width, E experts (El local ones under expert parallelism), K top-k,
S segments.

Execution follows the decision type:
- `SegmentDecision` (attribute / task / modality routers) on linear experts -> merged weights
  per segment (`moe.merge`): one dense matmul per segment, exactly the release's computation.
- `TokenDecision` (token / context routers, and whole-FFN experts under any router) -> token
  dispatch through the configured backend (`moe.backends`).

A sibling sublayer may reuse this layer's decision (the release routes attention-out with the
qkv decision and fc2 with the fc1 decision): pass the returned decision back in as `decision`.
Token decisions carry their dispatch plan, so the sibling does not recompute it.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from .backends import resolve_backend, run_dispatched
from .config import MoEConfig
from .dispatch import make_plan
from .experts import ACTIVATIONS, grouped_ffn, grouped_linear
from .kernels import use_onednn
from .losses import masked_router_losses, router_losses
from .merge import merge_expert_weights, merge_expert_weights_static, merged_segment_linear, segment_linear
from .parallel import ExpertParallel, ProcessGroup, fetch_experts, local_shard
from .routers import Decision, RoutingContext, SegmentDecision, TokenDecision, TokenGating, build_router
from .static import (
    StaticPlan,
    capacity_on_device,
    compute_dtype,
    grouped_mm_usable,
    make_static_plan,
    run_static,
    static_ffn,
    static_linear,
)
from .stats import stats_from_counts


class MoELinear(nn.Module):
    """E copies of nn.Linear(in_features, out_features) and (optionally) the router choosing them.

    `has_router=False` builds a layer that always receives a sibling's decision.
    `ep_group`: shard the experts over this expert-parallel process group (this rank keeps
    E / group size of them in `weight_EOI`).
    """

    EXPERT_PARAMS = ("weight_EOI", "bias_EO")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        cfg: MoEConfig | None = None,
        *,
        has_router: bool = True,
        ep_group: ProcessGroup | ExpertParallel | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else MoEConfig()
        self.in_features = in_features
        self.out_features = out_features
        self.expert_parallel = ExpertParallel.from_group(ep_group, self.cfg.num_experts)
        num_local = self.expert_parallel.num_local
        self.weight_EOI = nn.Parameter(torch.empty(num_local, out_features, in_features))
        self.bias_EO = nn.Parameter(torch.empty(num_local, out_features)) if bias else None
        self.router = build_router(in_features, self.cfg) if has_router else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert starts as an independent nn.Linear would.
        for e in range(self.weight_EOI.shape[0]):
            nn.init.kaiming_uniform_(self.weight_EOI[e], a=math.sqrt(5))
            if self.bias_EO is not None:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias_EO[e], -bound, bound)

    # --- routing ------------------------------------------------------------------------------

    def route(self, ctx: RoutingContext, x_BLI: Tensor | None = None) -> Decision:
        """This layer's routing decision (token routers need the features `x_BLI`)."""
        if self.router is None:
            raise RuntimeError("this MoELinear has no router: pass a sibling's decision")
        if self.cfg.data_independent:
            return self.router(ctx)
        if x_BLI is None:
            raise ValueError(f"router {self.cfg.router!r} needs the token features x_BLI")
        gating = self.router(x_BLI, ctx)
        return token_decision(gating, self.cfg, ctx, x_BLI.shape[0], x_BLI.shape[1], self.training, self.expert_parallel)

    # --- execution ----------------------------------------------------------------------------

    def forward(
        self,
        x_BLI: Tensor,
        ctx: RoutingContext,
        decision: Decision | None = None,
        out_slice: slice | None = None,
    ) -> tuple[Tensor, Decision]:
        static = self.cfg.static_execution(x_BLI.device)
        cache = ctx.merged_cache if not torch.is_grad_enabled() else None
        if cache is not None and self in cache:  # merged once per generation (see RoutingContext)
            decision, weight_SOI, bias_SO = cache[self]
            return segment_linear(x_BLI, weight_SOI, bias_SO, ctx.segment_starts, out_slice, not static), decision
        if decision is None:
            decision = self.route(ctx, x_BLI)
        if isinstance(decision, SegmentDecision):
            if self._fused_merge(x_BLI, static, out_slice):
                weight_EOI, bias_EO = self.local_experts()
                y_BLO = merged_segment_linear(
                    x_BLI, weight_EOI, bias_EO, decision.expert_ids_SK, decision.gates_SK, ctx.segment_starts
                )
                return y_BLO, decision
            weight_SOI, bias_SO = self.merged_weights(decision, static)
            if cache is not None:
                cache[self] = (decision, weight_SOI, bias_SO)
            y_BLO = segment_linear(x_BLI, weight_SOI, bias_SO, ctx.segment_starts, out_slice, not static)
            return y_BLO, decision
        weight_EOI, bias_EO = self.local_experts()
        expert_fn = partial(_linear_experts, weight_EOI, bias_EO, out_slice=out_slice)
        static_fn = partial(_static_linear_experts, weight_EOI, bias_EO, out_slice=out_slice)
        y_BLO = _dispatch(self.cfg, x_BLI, decision, expert_fn, self.expert_parallel, static_fn, (weight_EOI,))
        return y_BLO, decision

    def _fused_merge(self, x_BLI: Tensor, static: bool, out_slice: slice | None) -> bool:
        """Whether merge + segment products run as one autograd node (`merged_segment_linear`):
        eager fp32 CPU training (the oneDNN products of `moe.kernels`, where the node is bit for
        bit the two-step path), experts held locally, every output row."""
        return (
            not static  # first: under torch.compile nothing else here is evaluated
            and use_onednn(x_BLI)
            and torch.is_grad_enabled()  # (so no merged cache: that is inference only)
            and out_slice is None
            and not self.expert_parallel.enabled
            and not torch.is_autocast_enabled(x_BLI.device.type)
            and x_BLI.dtype == self.weight_EOI.dtype
        )

    def merged_weights(self, decision: SegmentDecision, static: bool = False) -> tuple[Tensor, Tensor | None]:
        """Per segment s: sum_k g[s,k] W[e[s,k]] (and the bias likewise); `static`: without
        reading the expert ids on the host."""
        weight_EOI, bias_EO = self.local_experts()
        if not self.expert_parallel.enabled:
            merge = merge_expert_weights_static if static else merge_expert_weights
            return merge(weight_EOI, bias_EO, decision.expert_ids_SK, decision.gates_SK)
        # Expert parallel: move the experts, not the tokens. Fetch only the experts this rank's
        # segments chose (their owners send them; backward returns their gradients to the
        # owners, and experts nobody chose get zero gradient there), then merge as above. The
        # fetch reads the ids on the host (its sizes are host-side), so there is no static path.
        ids_SK = decision.expert_ids_SK
        needed = sorted(set(ids_SK.reshape(-1).tolist()))
        weight_UOI = fetch_experts(weight_EOI, self.expert_parallel, needed)
        bias_UO = None if bias_EO is None else fetch_experts(bias_EO, self.expert_parallel, needed)
        remap = torch.full((self.cfg.num_experts,), -1, dtype=torch.long)
        remap[needed] = torch.arange(len(needed))
        return merge_expert_weights(weight_UOI, bias_UO, remap[ids_SK.cpu()].to(ids_SK.device), decision.gates_SK)

    def local_experts(self) -> tuple[Tensor, Tensor | None]:
        """This rank's expert rows (the local shard when the parameters are DTensors)."""
        bias = None if self.bias_EO is None else local_shard(self.bias_EO)
        return local_shard(self.weight_EOI), bias

    def extra_repr(self) -> str:
        ep = self.expert_parallel
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.cfg.num_experts}"
            + (f" ({ep.num_local} local of ep_size {ep.size})" if ep.sharded else "")
            + f", top_k={self.cfg.top_k}, "
            f"router={self.cfg.router if self.router is not None else 'shared'}"
        )


def _linear_experts(weight_EOI, bias_EO, x_MI, counts, out_slice=None):
    return grouped_linear(x_MI, weight_EOI, bias_EO, counts, out_slice)


def _static_linear_experts(weight_EOI, bias_EO, x, plan, layout, out_slice=None):
    return static_linear(x, weight_EOI, bias_EO, plan, layout, out_slice)


def _dispatch(cfg: MoEConfig, x_BLI: Tensor, decision: TokenDecision, expert_fn, ep: ExpertParallel,
              static_fn=None, weights: tuple[Tensor, ...] = ()) -> Tensor:
    """Run a token decision's dispatch plan on x_BLI through the configured backend (B x L x O).

    A `StaticPlan` runs `static_fn` on the grouped layout where `torch._grouped_mm` takes these
    `weights`, on the capacity-padded one otherwise."""
    batch, length, _ = x_BLI.shape
    _check_token_decision(decision, batch, length)
    if isinstance(decision.plan, StaticPlan):
        x_TI = x_BLI.reshape(batch * length, -1)
        backend = resolve_backend(cfg.backend, x_BLI.device)
        if backend == "tutel":
            expert_fn = partial(static_fn, plan=decision.plan, layout="padded")
            y_TO = run_dispatched(backend, x_TI, decision.expert_ids_TK, decision.gates_TK, decision.plan,
                                  lambda x_MI, counts: expert_fn(x_MI.view(len(counts), counts[0], -1)).flatten(0, 1),
                                  ep)
        else:
            layout = "grouped" if grouped_mm_usable(x_TI.device, compute_dtype(x_TI), *weights) else "padded"
            y_TO = run_static(x_TI, decision.gates_TK, decision.plan, static_fn, layout)
        return y_TO.view(batch, length, -1)
    y_TO = run_dispatched(
        resolve_backend(cfg.backend, x_BLI.device),
        x_BLI.reshape(batch * length, -1),
        decision.expert_ids_TK,
        decision.gates_TK,
        decision.plan,
        expert_fn,
        ep,
    )
    return y_TO.view(batch, length, -1)


def _check_token_decision(decision: TokenDecision, batch: int, length: int) -> None:
    if (decision.batch, decision.length) != (batch, length):
        raise ValueError(
            f"a token decision made for ({decision.batch}, {decision.length}) tokens cannot "
            f"route ({batch}, {length}) tokens"
        )


def token_decision(
    gating: TokenGating,
    cfg: MoEConfig,
    ctx: RoutingContext,
    batch: int,
    length: int,
    training: bool,
    ep: ExpertParallel,
    force_dropless: bool = False,
) -> TokenDecision:
    """Turn a token gating into an executable decision: plan, losses over real tokens, stats."""
    device = gating.expert_ids_TK.device
    valid_T = ctx.valid_tokens_T(batch, length)
    if valid_T is not None:
        valid_T = valid_T.to(device)
    priority_T = gating.gates_TK[:, 0].detach() if cfg.batch_prioritized else None
    capped = not force_dropless and not cfg.dropless
    if cfg.static_execution(device) and not ep.enabled:
        # Device-resident: the buffer bound comes from the static token count; with padding the
        # real capacity is a device scalar that only masks (moe.static). No host sync.
        rows = capacity = None
        if capped:
            rows = capacity = cfg.capacity(batch * length, training)
            if valid_T is not None:
                capacity = capacity_on_device(valid_T.sum(), cfg.capacity_factor(training), cfg.top_k,
                                              cfg.num_experts, cfg.min_capacity)
        plan = make_static_plan(gating.expert_ids_TK, cfg.num_experts, rows, capacity, valid_T, priority_T)
    else:
        capacity = None
        if capped:
            num_real = batch * length if valid_T is None else int(valid_T.sum())
            # Expert-parallel ranks agree on the token count that sets capacity, so every rank
            # budgets the same number of slots per expert (needed by padded backends).
            capacity = cfg.capacity(ep.max_over_group(num_real), training)
        plan = make_plan(gating.expert_ids_TK, cfg.num_experts, capacity, valid_T, priority_T)
    losses = None
    # Aux losses only feed a backward pass: skip them (and their host syncs) in inference.
    if gating.logits_TE is not None and torch.is_grad_enabled():
        logits_TE, top1_T = gating.logits_TE, gating.expert_ids_TK[:, 0]
        if valid_T is None:
            losses = router_losses(logits_TE, top1_T)
        elif isinstance(plan, StaticPlan):
            losses = masked_router_losses(logits_TE, top1_T, valid_T)
        else:
            losses = router_losses(logits_TE[valid_T], top1_T[valid_T])
    return TokenDecision(
        expert_ids_TK=gating.expert_ids_TK,
        gates_TK=gating.gates_TK,
        logits_TE=gating.logits_TE,
        plan=plan,
        batch=batch,
        length=length,
        losses=losses,
        stats=stats_from_counts(plan.routed_E, capacity),
    )


def segment_to_token_decision(
    decision: SegmentDecision, cfg: MoEConfig, ctx: RoutingContext, batch: int, length: int,
    ep: ExpertParallel,
) -> TokenDecision:
    """Broadcast a segment decision to its tokens and plan a dropless dispatch (exact mixture)."""
    seg_L = ctx.segment_index_L(length, decision.expert_ids_SK.device)
    expert_ids_TK = decision.expert_ids_SK[seg_L].repeat(batch, 1)
    gates_TK = decision.gates_SK[seg_L].repeat(batch, 1)
    gating = TokenGating(expert_ids_TK, gates_TK, None)
    token = token_decision(gating, cfg, ctx, batch, length, False, ep, force_dropless=True)
    token.losses = decision.losses
    return token


class MoEFFN(nn.Module):
    """A routed feed-forward block: fc1 (D -> F), activation, fc2 (F -> D).

    cfg.expert_type == "linear" (the release): fc1 and fc2 are separate `MoELinear`s sharing one
    decision; under data-independent routing they are merged, GELU(x W1_bar) W2_bar.
    cfg.expert_type == "ffn": every expert is a whole FFN and the output is the exact mixture
    sum_k g_k FFN_{e_k}(x) (for data-independent routers too: their segment decision is
    broadcast to the tokens and dispatched without drops).
    Parameters are `fc1.weight_EOI`, `fc1.bias_EO`, `fc1.router.*`, `fc2.weight_EOI`, `fc2.bias_EO`
    in both modes.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        cfg: MoEConfig | None = None,
        *,
        bias: bool = True,
        activation: str = "gelu",
        ep_group: ProcessGroup | ExpertParallel | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        self.cfg = cfg if cfg is not None else MoEConfig()
        self.activation = activation
        self.fc1 = MoELinear(d_model, d_ff, bias, self.cfg, has_router=True, ep_group=ep_group)
        self.fc2 = MoELinear(d_ff, d_model, bias, self.cfg, has_router=False, ep_group=ep_group)

    def route(self, ctx: RoutingContext, x_BLD: Tensor | None = None) -> Decision:
        return self.fc1.route(ctx, x_BLD)

    def forward(
        self, x_BLD: Tensor, ctx: RoutingContext, decision: Decision | None = None
    ) -> tuple[Tensor, Decision]:
        return routed_ffn(self.fc1, self.fc2, x_BLD, ctx, decision, self.activation)


def routed_ffn(
    fc1: MoELinear,
    fc2: MoELinear,
    x_BLD: Tensor,
    ctx: RoutingContext,
    decision: Decision | None = None,
    activation: str = "gelu",
) -> tuple[Tensor, Decision]:
    """fc2(act(fc1(x))) with ONE decision (fc1's router) for both, by fc1.cfg.expert_type:
    "linear": two routed linears sharing the decision (merged under data-independent routing);
    "ffn": whole-FFN experts, the exact mixture sum_k g_k FFN_{e_k}(x) (a segment decision is
    broadcast to its tokens and dispatched without drops). `MoEFFN` is these two linears as a
    module; models that own fc1/fc2 under their own names call this directly."""
    cfg = fc1.cfg
    if decision is None:
        decision = fc1.route(ctx, x_BLD)
    if cfg.expert_type == "linear":
        h_BLF, _ = fc1(x_BLD, ctx, decision)
        y_BLD, _ = fc2(ACTIVATIONS[activation](h_BLF), ctx, decision)
        return y_BLD, decision
    batch, length, _ = x_BLD.shape
    token = decision
    if isinstance(decision, SegmentDecision):
        token = segment_to_token_decision(decision, cfg, ctx, batch, length, fc1.expert_parallel)
    weights = (*fc1.local_experts(), *fc2.local_experts())
    expert_fn = partial(_ffn_experts, *weights, activation=activation)
    static_fn = partial(_static_ffn_experts, *weights, activation=activation)
    y_BLD = _dispatch(cfg, x_BLD, token, expert_fn, fc1.expert_parallel, static_fn, (weights[0], weights[2]))
    return y_BLD, decision


def _ffn_experts(w1_EFD, b1_EF, w2_EDF, b2_ED, x_MD, counts, activation="gelu"):
    return grouped_ffn(x_MD, w1_EFD, b1_EF, w2_EDF, b2_ED, counts, activation)




def _static_ffn_experts(w1_EFD, b1_EF, w2_EDF, b2_ED, x, plan, layout, activation="gelu"):
    return static_ffn(x, w1_EFD, b1_EF, w2_EDF, b2_ED, plan, layout, activation)
