"""The shared pre-LN Transformer encoder with layer scale, drop path and MoE sublayers.

Shape legend: B batch, L query length, M key/value length (history + new tokens), D model width,
H heads, Dh head width, F FFN width.

Every sublayer linear (qkv, attention out, fc1, fc2) is either a dense nn.Linear or a
`moe.MoELinear`; attention-out reuses the qkv decision through MoELinear's sibling-decision
argument, and a routed fc1 -> fc2 pair runs as the library's routed FFN (`moe.routed_ffn`:
linear or whole-FFN experts, model.moe.routing.expert_type). Routing context arrives as an
argument on every call (never a global), and the routing decisions of the call are returned so
callers can log or check them.

One call may encode several sequence groups (`Encoder.forward_groups`): their tokens form one
row, so the layer norms and every linear/MoE sublayer run once over all of them (every MoE
sublayer runs once per call: what expert-parallel collectives need), and only attention runs
per group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from moe import Decision, MoELinear, RoutingContext, routed_ffn

from ..config.model import ModelConfig, PromptConfig


@dataclass
class LayerCache:
    """Keys and values of the tokens already encoded, per layer: [B, H, M, Dh]."""

    key_BHMd: Tensor
    value_BHMd: Tensor

    def select(self, index_B: Tensor) -> LayerCache:
        return LayerCache(self.key_BHMd[index_B], self.value_BHMd[index_B])


@dataclass
class EncoderOutput:
    hidden_BLD: Tensor
    # (sublayer name, decision) for every routed MoE call, in call order.
    decisions: list[tuple[str, Decision]] = field(default_factory=list)
    # Per-layer key/value of this call's tokens (when asked for), to extend a decoding cache.
    caches: list[LayerCache] | None = None


@dataclass
class SequenceGroup:
    """One batch of equal-layout sequences inside a joint encoder call: embedded tokens
    [B, L, D], its routing context (segments along L), its attention mask and decoding cache."""

    x_BLD: Tensor
    ctx: RoutingContext
    allowed_BHLM: Tensor | None = None
    caches: list[LayerCache] | None = None
    role: str = "input"  # 'input' or 'target': which deep prompts (prompt tuning)


@dataclass
class _GroupRows:
    """Where a group's tokens sit in the joint row of T tokens.

    Rows are segment-major inside a group (all samples' segment 0, then segment 1, ...), so every
    routing segment of every group is one contiguous block of rows: merged-weight segments run
    one matmul on exactly the rows a separate call would use. `seq_from_flat` reorders the
    group's rows to [B*L] sequence-major for attention and `flat_from_seq` back (None when the
    group has one segment: both orders coincide).
    """

    batch: int
    length: int
    start: int
    first_sample: int
    allowed_BHLM: Tensor | None
    caches: list[LayerCache] | None
    seq_from_flat: Tensor | None
    flat_from_seq: Tensor | None
    ctx: RoutingContext  # the group's own context ([B, L] layout)
    role: str = "input"

    @property
    def stop(self) -> int:
        return self.start + self.batch * self.length


@dataclass
class TokenLayout:
    """The joint row: every group's rows, the sample index of every row (drop path per sample),
    and the routing context of the whole row (segments of every group, in order)."""

    groups: list[_GroupRows]
    sample_T: Tensor
    num_samples: int
    ctx: RoutingContext

    @classmethod
    def build(cls, groups: list[SequenceGroup]) -> TokenLayout:
        rows, starts, pads, samples = [], [], [], []
        attrs, tasks, mods = [], [], []
        offset = sample = 0
        for g in groups:
            b, length, _ = g.x_BLD.shape
            device = g.x_BLD.device
            bounds = list(g.ctx.segment_starts) + [length]
            seq_from_flat = flat_from_seq = None
            if len(bounds) > 2:
                b_B1 = torch.arange(b, device=device)[:, None] * length
                flat_from_seq = torch.cat([(b_B1 + torch.arange(lo, hi, device=device)).reshape(-1)
                                           for lo, hi in zip(bounds, bounds[1:])])
                seq_from_flat = torch.empty_like(flat_from_seq)
                seq_from_flat[flat_from_seq] = torch.arange(b * length, device=device)
            sample_BL = (torch.arange(b, device=device)[:, None] + sample).expand(b, length).reshape(-1)
            samples.append(sample_BL if flat_from_seq is None else sample_BL[flat_from_seq])
            starts.extend(offset + b * lo for lo in bounds[:-1])
            if g.ctx.padding_mask_BL is not None:
                pad_T = g.ctx.padding_mask_BL.reshape(-1).bool()
                pads.append(pad_T if flat_from_seq is None else pad_T[flat_from_seq.to(pad_T.device)])
            else:
                pads.append(None)
            attrs.append(g.ctx.attributes_SA)
            tasks.append(g.ctx.task_ids_S)
            mods.append(g.ctx.modality_ids_S)
            rows.append(_GroupRows(b, length, offset, sample, g.allowed_BHLM, g.caches, seq_from_flat, flat_from_seq,
                                   g.ctx, g.role))
            offset += b * length
            sample += b

        def joined(parts: list[Tensor | None]) -> Tensor | None:
            return None if any(p is None for p in parts) else torch.cat(parts)

        sample_T = torch.cat(samples) if len(samples) > 1 else samples[0]
        pad_T = None
        if any(p is not None for p in pads):
            pad_T = torch.cat([torch.zeros(g.x_BLD.shape[0] * g.x_BLD.shape[1], dtype=torch.bool,
                                           device=g.x_BLD.device) if p is None else p for g, p in zip(groups, pads)])
        ctx = RoutingContext(
            segment_starts=tuple(starts),
            attributes_SA=joined(attrs),
            task_ids_S=joined(tasks),
            modality_ids_S=joined(mods),
            padding_mask_BL=None if pad_T is None else pad_T[None],
            sequence_ids_T=sample_T,
            num_sequences=sample,
            # A single group keeps its inference cache of merged expert weights (decoding).
            merged_cache=groups[0].ctx.merged_cache if len(groups) == 1 else None,
        )
        return cls(rows, sample_T, sample, ctx)

    def flatten(self, groups: list[SequenceGroup]) -> Tensor:
        """Every group's [B, L, D] tokens -> the joint row [T, D]."""
        parts = []
        for g, rows in zip(groups, self.groups):
            x_TD = g.x_BLD.reshape(-1, g.x_BLD.shape[-1])
            parts.append(x_TD if rows.flat_from_seq is None else x_TD.index_select(0, rows.flat_from_seq))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def unflatten(self, x_TD: Tensor) -> list[Tensor]:
        """The joint row -> every group's [B, L, D]."""
        out = []
        for rows in self.groups:
            x = x_TD[rows.start : rows.stop]
            if rows.seq_from_flat is not None:
                x = x.index_select(0, rows.seq_from_flat)
            out.append(x.view(rows.batch, rows.length, -1))
        return out


def _linear(
    layer: nn.Module,
    x: Tensor,
    ctx: RoutingContext,
    decision: Decision | None,
    out_slice: slice | None = None,
) -> tuple[Tensor, Decision | None]:
    """Call a dense or MoE sublayer linear the same way."""
    if isinstance(layer, MoELinear):
        return layer(x, ctx, decision, out_slice)
    weight, bias = layer.weight, layer.bias
    if out_slice is not None:
        weight, bias = weight[out_slice], None if bias is None else bias[out_slice]
    return F.linear(x, weight, bias), None


class DeepPrompt(nn.Module):
    """One layer's deep prompts (OFFICIAL.md 1.5): learned key/value tokens [P, D] for inputs
    and, unless shared, separate ones for targets. The name keeps 'deep_prompt_embedding' (the
    release's) so the release's freezing substrings select it."""

    def __init__(self, d_model: int, cfg: PromptConfig) -> None:
        super().__init__()
        # N(0, 0.02), as the release's MAE init draws its nn.Embedding tables.
        self.input_PD = nn.Parameter(torch.randn(cfg.input_length, d_model) * 0.02)
        self.target_PD = (
            nn.Parameter(torch.randn(cfg.target_length, d_model) * 0.02) if cfg.separate_target else None
        )

    def table(self, role: str) -> Tensor:
        """The prompts of a sequence of this role: targets use their own table when it exists."""
        return self.target_PD if role == "target" and self.target_PD is not None else self.input_PD


def _prompt_context(ctx: RoutingContext, num_prompts: int) -> RoutingContext:
    """Routing of [prompts ; tokens]: the prompts join the first segment's expert merge (the
    release moves its key/value split point by the prompt length)."""
    starts = (0,) + tuple(s + num_prompts for s in ctx.segment_starts[1:])
    pad = ctx.padding_mask_BL
    if pad is not None:
        pad = torch.cat([pad.new_zeros(pad.shape[0], num_prompts), pad], dim=1)
    return replace(ctx, segment_starts=starts, padding_mask_BL=pad)


class EncoderLayer(nn.Module):
    """x = x + g1 * DropPath(Attn(LN1(x))); x = x + g2 * DropPath(FFN(LN2(x))).

    It runs on a joint row of tokens from several sequence groups (`TokenLayout`): the layer
    norms, every linear and every MoE sublayer run ONCE over all tokens; only attention runs per
    group (each with its own length and mask).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, drop_path_rate: float) -> None:
        super().__init__()
        d, f = cfg.d_model, cfg.d_ffn
        self.num_heads = cfg.num_heads
        self.drop_path_rate = drop_path_rate
        moe_cfg = cfg.moe
        moe_here = layer_idx in moe_cfg.layer_indices(cfg.num_layers)
        shared = moe_cfg.share_decisions

        def linear(name: str, n_in: int, n_out: int, routes: bool) -> nn.Module:
            if moe_here and name in moe_cfg.sublayers:
                return MoELinear(n_in, n_out, cfg=moe_cfg.routing, has_router=routes)
            return nn.Linear(n_in, n_out)

        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.qkv = linear("qkv", d, 3 * d, True)
        self.attn_out = linear("attn_out", d, d, not shared)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = linear("fc1", d, f, True)
        self.fc2 = linear("fc2", f, d, not shared)
        self.share_decisions = shared
        if cfg.layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(torch.full((d,), cfg.layer_scale_init))
            self.gamma_2 = nn.Parameter(torch.full((d,), cfg.layer_scale_init))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.deep_prompt_embedding = DeepPrompt(d, cfg.prompt) if cfg.prompt.deep else None

    @staticmethod
    def _scale(gamma: Tensor | None, y: Tensor, residual: Tensor) -> Tensor:
        # Layer scale in fp32 even under autocast (gamma starts at 1e-3); the residual stream
        # keeps its own dtype.
        return y.to(residual.dtype) if gamma is None else (gamma.float() * y.float()).to(residual.dtype)

    def _drop_path(self, y_TD: Tensor, layout: TokenLayout) -> Tensor:
        """Stochastic depth per sample (timm's DropPath): one draw per sample of every group."""
        p = self.drop_path_rate
        if p == 0.0 or not self.training:
            return y_TD
        keep = 1.0 - p
        mask_N = y_TD.new_empty((layout.num_samples,)).bernoulli_(keep)
        return y_TD * mask_N[layout.sample_T][:, None] / keep

    def _attention(self, qkv_T3D: Tensor, layout: TokenLayout, layer_idx: int, keep_kv: bool
                   ) -> tuple[Tensor, list[LayerCache] | None]:
        d = qkv_T3D.shape[-1] // 3
        h, dh = self.num_heads, d // self.num_heads
        outs, new_kv = [], [] if keep_kv else None
        for rows in layout.groups:
            qkv = qkv_T3D[rows.start : rows.stop]
            if rows.seq_from_flat is not None:
                qkv = qkv.index_select(0, rows.seq_from_flat)
            q_BHLd, k_BHLd, v_BHLd = qkv.view(rows.batch, rows.length, 3, h, dh).permute(2, 0, 3, 1, 4)
            if new_kv is not None:
                new_kv.append(LayerCache(k_BHLd, v_BHLd))
            if rows.caches is not None:
                cache = rows.caches[layer_idx]
                k_BHLd = torch.cat([cache.key_BHMd, k_BHLd], dim=2)
                v_BHLd = torch.cat([cache.value_BHMd, v_BHLd], dim=2)
            attn_BHLd = F.scaled_dot_product_attention(q_BHLd, k_BHLd, v_BHLd, attn_mask=rows.allowed_BHLM)
            attn_TD = attn_BHLd.transpose(1, 2).reshape(rows.batch * rows.length, d)
            if rows.flat_from_seq is not None:
                attn_TD = attn_TD.index_select(0, rows.flat_from_seq)
            outs.append(attn_TD)
        return (outs[0] if len(outs) == 1 else torch.cat(outs)), new_kv

    def _prompt_attention(self, xn_TD: Tensor, layout: TokenLayout, keep_kv: bool
                          ) -> tuple[Decision | None, Tensor, list[LayerCache] | None]:
        """Attention with deep prompts (one group: `Encoder.forward_groups` runs groups one by
        one when the layers hold prompts). The release's split path: queries from the tokens
        (first third of the qkv weights), keys/values from [norm1(prompts) ; norm1(tokens)] (last
        two thirds) with one decision; prompts are never masked and never queries."""
        (rows,) = layout.groups
        d = xn_TD.shape[-1]
        b, length, h = rows.batch, rows.length, self.num_heads
        dh = d // h
        q_1TD, attn_decision = _linear(self.qkv, xn_TD[None], layout.ctx, None, slice(0, d))
        q_TD = q_1TD.squeeze(0) if rows.seq_from_flat is None else q_1TD.squeeze(0).index_select(0, rows.seq_from_flat)
        xn = xn_TD if rows.seq_from_flat is None else xn_TD.index_select(0, rows.seq_from_flat)
        xn_BLD = xn.view(b, length, d)
        prompt_PD = self.deep_prompt_embedding.table(rows.role)
        p = prompt_PD.shape[0]
        # norm1 over the prompts expanded to the batch, as the release: same values, and its
        # gradient is summed in the same order (it matters at 1e-4 over a 49,411-word vocabulary).
        prompt_BPD = self.norm1(prompt_PD.expand(b, p, d)).to(xn_BLD.dtype)
        kv_in_BMD = torch.cat([prompt_BPD, xn_BLD], dim=1)
        kv_BM2D, _ = _linear(self.qkv, kv_in_BMD, _prompt_context(rows.ctx, p), attn_decision, slice(d, 3 * d))
        q_BHLd = q_TD.view(b, length, h, dh).transpose(1, 2)
        k_BHMd, v_BHMd = kv_BM2D.view(b, p + length, 2, h, dh).permute(2, 0, 3, 1, 4)
        allowed = rows.allowed_BHLM
        if allowed is not None:
            allowed = torch.cat([allowed.new_ones(*allowed.shape[:-1], p), allowed], -1)
        attn_BHLd = F.scaled_dot_product_attention(q_BHLd, k_BHMd, v_BHMd, attn_mask=allowed)
        attn_TD = attn_BHLd.transpose(1, 2).reshape(b * length, d)
        if rows.flat_from_seq is not None:
            attn_TD = attn_TD.index_select(0, rows.flat_from_seq)
        return attn_decision, attn_TD, [LayerCache(k_BHMd, v_BHMd)] if keep_kv else None

    def forward(
        self,
        x_TD: Tensor,
        layout: TokenLayout,
        layer_idx: int = 0,
        keep_kv: bool = False,
        name: str = "",
    ) -> tuple[Tensor, list[tuple[str, Decision]], list[LayerCache] | None]:
        """One layer over the joint row x_TD [T, D]; returns the new row, the routing decisions
        and (with keep_kv) every group's new keys/values."""
        decisions: list[tuple[str, Decision]] = []
        ctx = layout.ctx

        # MoE layers see the row as a batch of one sequence of T tokens (segments = blocks).
        # [None] / squeeze(0) are views both ways (indexing [0] would make backward zero-fill
        # and copy a [1, T, ...] gradient per sublayer).
        xn_TD = self.norm1(x_TD)
        if self.deep_prompt_embedding is not None and layout.groups[0].caches is None:
            attn_decision, attn_TD, new_kv = self._prompt_attention(xn_TD, layout, keep_kv)
        else:
            qkv_1T3D, attn_decision = _linear(self.qkv, xn_TD[None], ctx, None)
            attn_TD, new_kv = self._attention(qkv_1T3D.squeeze(0), layout, layer_idx, keep_kv)
        if attn_decision is not None:
            decisions.append((f"{name}.qkv", attn_decision))
        out_decision = attn_decision if self.share_decisions else None
        attn_1TD, own = _linear(self.attn_out, attn_TD[None], ctx, out_decision)
        if own is not None and own is not attn_decision:
            decisions.append((f"{name}.attn_out", own))
        x_TD = x_TD + self._drop_path(self._scale(self.gamma_1, attn_1TD.squeeze(0), x_TD), layout)

        y_1TD, ffn_decisions = self._ffn(self.norm2(x_TD)[None], ctx, name)
        decisions.extend(ffn_decisions)
        x_TD = x_TD + self._drop_path(self._scale(self.gamma_2, y_1TD.squeeze(0), x_TD), layout)
        return x_TD, decisions, new_kv

    def _ffn(self, x_1TD: Tensor, ctx: RoutingContext, name: str) -> tuple[Tensor, list[tuple[str, Decision]]]:
        if self.share_decisions and isinstance(self.fc1, MoELinear) and isinstance(self.fc2, MoELinear):
            # The routed FFN of the MoE library: one decision for fc1 and fc2, linear experts
            # (merged per segment / dispatched per token) or whole-FFN experts.
            y_1TD, decision = routed_ffn(self.fc1, self.fc2, x_1TD, ctx, None, "gelu")
            return y_1TD, [(f"{name}.fc1", decision)]
        hidden_1TF, ffn_decision = _linear(self.fc1, x_1TD, ctx, None)
        decisions = [] if ffn_decision is None else [(f"{name}.fc1", ffn_decision)]
        fc2_decision = ffn_decision if self.share_decisions else None
        y_1TD, own = _linear(self.fc2, F.gelu(hidden_1TF), ctx, fc2_decision)
        if own is not None and own is not ffn_decision:
            decisions.append((f"{name}.fc2", own))
        return y_1TD, decisions


class Encoder(nn.Module):
    """A stack of `EncoderLayer`s; no final LayerNorm (the predictor's ln_post plays that role)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # The release uses the same drop-path rate in every layer (DROP_PATH_PROB_FIXED).
        self.layers = nn.ModuleList(
            EncoderLayer(cfg, i, cfg.drop_path) for i in range(cfg.num_layers)
        )
        # Recompute each layer's activations in backward instead of storing them (training only).
        self.activation_checkpointing = False
        # Set by the trainer when every micro-step encodes in ONE call (train.one_encoder_call):
        # then every layer runs exactly once per micro-step, which FSDP's per-layer groups need.
        self.one_call_per_step = False

    def forward(
        self,
        x_BLD: Tensor | None = None,
        ctx: RoutingContext | None = None,
        allowed_BHLM: Tensor | None = None,
        caches: list[LayerCache] | None = None,
        keep_kv: bool = False,
        role: str = "input",
        *,
        groups: list[SequenceGroup] | None = None,
    ):
        """Encode one batch of sequences -> EncoderOutput; or with `groups=`, several in one
        joint call -> what `forward_groups` returns (called through the module, so forward
        hooks, e.g. the trainer's FLOP count, see every call)."""
        if groups is not None:
            return self.forward_groups(groups, keep_kv)
        group = SequenceGroup(x_BLD, ctx, allowed_BHLM, caches, role)
        hidden, decisions, kv = self.forward_groups([group], keep_kv)
        return EncoderOutput(hidden[0], decisions, None if kv is None else kv[0])

    def forward_groups(
        self, groups: list[SequenceGroup], keep_kv: bool = False
    ) -> tuple[list[Tensor], list[tuple[str, Decision]], list[list[LayerCache]] | None]:
        """Encode several sequence groups in ONE pass: hidden states [B, L, D] per group, the
        routing decisions of the joint call (every routed sublayer once), and with keep_kv the
        per-layer keys/values of every group."""
        if not groups:
            raise ValueError("forward_groups needs at least one sequence group")
        if len(groups) > 1 and any(layer.deep_prompt_embedding is not None for layer in self.layers):
            # Deep prompts widen every group's keys/values by its own prompt table, on the
            # release's split qkv path: groups run one by one (not combinable with expert
            # parallelism, which the config refuses).
            outs = [self.forward_groups([g], keep_kv) for g in groups]
            caches = [o[2][0] for o in outs] if keep_kv else None
            return [o[0][0] for o in outs], [d for o in outs for d in o[1]], caches
        layout = TokenLayout.build(groups)
        x_TD = layout.flatten(groups)
        decisions: list[tuple[str, Decision]] = []
        kv_per_layer: list[list[LayerCache]] = []
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # Non-reentrant checkpointing replays the saved RNG state, so drop path and gate
                # noise draw the same values in the recomputation.
                x_TD, layer_decisions, kv = torch.utils.checkpoint.checkpoint(
                    layer, x_TD, layout, i, keep_kv, f"layers.{i}", use_reentrant=False
                )
            else:
                x_TD, layer_decisions, kv = layer(x_TD, layout, i, keep_kv, name=f"layers.{i}")
            decisions.extend(layer_decisions)
            if kv is not None:
                kv_per_layer.append(kv)
        hidden = layout.unflatten(x_TD)
        caches = None
        if keep_kv:
            caches = [[kv_per_layer[i][g] for i in range(len(self.layers))] for g in range(len(groups))]
        return hidden, decisions, caches


def init_weights_like_release(module: nn.Module) -> None:
    """MAE-style init (OFFICIAL.md 1.4): xavier-uniform linears (q, k, v as separate matrices),
    N(0, 0.02) embeddings, LayerNorm 1/0, patch conv xavier on its flattened view, zero biases,
    every expert copy initialised independently by the same rule."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            _xavier_linear(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, MoELinear):
            for e in range(m.weight_EOI.shape[0]):
                _xavier_linear(m.weight_EOI.data[e])
            if m.bias_EO is not None:
                nn.init.zeros_(m.bias_EO)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.data.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _xavier_linear(weight: Tensor) -> None:
    out_f, in_f = weight.shape
    if out_f == 3 * in_f:
        # Fused qkv: treat q, k and v as three [D, D] matrices.
        bound = math.sqrt(6.0 / (in_f + in_f))
    else:
        bound = math.sqrt(6.0 / (in_f + out_f))
    with torch.no_grad():
        weight.uniform_(-bound, bound)
