"""The shared pre-LN Transformer encoder with layer scale, drop path and MoE sublayers.

Shape legend: B batch, L query length, M key/value length (history + new tokens), D model width,
H heads, Dh head width, F FFN width.

Every sublayer linear (qkv, attention out, fc1, fc2) is either a dense nn.Linear or a
`moe.MoELinear`; routing context arrives as an argument on every call (never a global), and the
routing decisions of the call are returned so callers can log or check them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from moe import MoELinear, RoutingContext, SegmentDecision

from ..config.model import ModelConfig, PromptConfig


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth per sample, scaled by 1/(1-p) (timm's DropPath)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


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
    decisions: list[tuple[str, SegmentDecision]] = field(default_factory=list)
    # Per-layer key/value of this call's tokens (when asked for), to extend a decoding cache.
    caches: list[LayerCache] | None = None


def _linear(
    layer: nn.Module,
    x: Tensor,
    ctx: RoutingContext,
    decision: SegmentDecision | None,
    out_slice: slice | None = None,
) -> tuple[Tensor, SegmentDecision | None]:
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
    """x = x + g1 * DropPath(Attn(LN1(x))); x = x + g2 * DropPath(FFN(LN2(x)))."""

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

    def forward(
        self,
        x_BLD: Tensor,
        ctx: RoutingContext,
        allowed_BHLM: Tensor | None = None,
        cache: LayerCache | None = None,
        keep_kv: bool = False,
        name: str = "",
        role: str = "input",
    ) -> tuple[Tensor, list[tuple[str, SegmentDecision]], LayerCache | None]:
        """`allowed_BHLM` (bool, True = may attend; broadcastable) masks attention. With `cache`,
        the new tokens attend to the cached keys/values followed by their own. `role` ('input' or
        'target') picks the deep prompts; they are prepended to the keys/values of a call without
        cache (and so sit at the front of the cache it returns), never to the queries."""
        decisions: list[tuple[str, SegmentDecision]] = []
        b, length, d = x_BLD.shape
        h, dh = self.num_heads, d // self.num_heads

        xn_BLD = self.norm1(x_BLD)
        if self.deep_prompt_embedding is None or cache is not None:
            qkv_BL3D, attn_decision = _linear(self.qkv, xn_BLD, ctx, None)
            q_BHLd, k_BHMd, v_BHMd = qkv_BL3D.view(b, length, 3, h, dh).permute(2, 0, 3, 1, 4)
        else:
            # The release's split path: queries from the tokens (first third of the qkv weights),
            # keys/values from [norm1(prompts) ; norm1(tokens)] (last two thirds), one decision.
            prompt_PD = self.deep_prompt_embedding.table(role)
            p = prompt_PD.shape[0]
            q_BLD, attn_decision = _linear(self.qkv, xn_BLD, ctx, None, slice(0, d))
            # norm1 over the prompts expanded to the batch, as the release: same values, and its
            # gradient is summed in the same order (it matters at 1e-4 over a 49,411-word vocabulary).
            prompt_BPD = self.norm1(prompt_PD.expand(b, p, d)).to(xn_BLD.dtype)
            kv_in_BMD = torch.cat([prompt_BPD, xn_BLD], dim=1)
            kv_BM2D, _ = _linear(self.qkv, kv_in_BMD, _prompt_context(ctx, p), attn_decision, slice(d, 3 * d))
            q_BHLd = q_BLD.view(b, length, h, dh).transpose(1, 2)
            k_BHMd, v_BHMd = kv_BM2D.view(b, p + length, 2, h, dh).permute(2, 0, 3, 1, 4)
            if allowed_BHLM is not None:  # prompts are never masked
                allowed_BHLM = torch.cat([allowed_BHLM.new_ones(*allowed_BHLM.shape[:-1], p), allowed_BHLM], -1)
        if attn_decision is not None:
            decisions.append((f"{name}.qkv", attn_decision))
        new_kv = LayerCache(k_BHMd, v_BHMd) if keep_kv else None
        if cache is not None:
            k_BHMd = torch.cat([cache.key_BHMd, k_BHMd], dim=2)
            v_BHMd = torch.cat([cache.value_BHMd, v_BHMd], dim=2)
        attn_BHLd = F.scaled_dot_product_attention(q_BHLd, k_BHMd, v_BHMd, attn_mask=allowed_BHLM)
        attn_BLD = attn_BHLd.transpose(1, 2).reshape(b, length, d)
        out_decision = attn_decision if self.share_decisions else None
        attn_BLD, own = _linear(self.attn_out, attn_BLD, ctx, out_decision)
        if own is not None and own is not attn_decision:
            decisions.append((f"{name}.attn_out", own))
        x_BLD = x_BLD + drop_path(self._scale(self.gamma_1, attn_BLD, x_BLD), self.drop_path_rate, self.training)

        hidden_BLF, ffn_decision = _linear(self.fc1, self.norm2(x_BLD), ctx, None)
        if ffn_decision is not None:
            decisions.append((f"{name}.fc1", ffn_decision))
        fc2_decision = ffn_decision if self.share_decisions else None
        y_BLD, own = _linear(self.fc2, F.gelu(hidden_BLF), ctx, fc2_decision)
        if own is not None and own is not ffn_decision:
            decisions.append((f"{name}.fc2", own))
        x_BLD = x_BLD + drop_path(self._scale(self.gamma_2, y_BLD, x_BLD), self.drop_path_rate, self.training)
        return x_BLD, decisions, new_kv


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

    def forward(
        self,
        x_BLD: Tensor,
        ctx: RoutingContext,
        allowed_BHLM: Tensor | None = None,
        caches: list[LayerCache] | None = None,
        keep_kv: bool = False,
        role: str = "input",
    ) -> EncoderOutput:
        decisions: list[tuple[str, SegmentDecision]] = []
        new_caches: list[LayerCache] | None = [] if keep_kv else None
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # Non-reentrant checkpointing replays the saved RNG state, so drop path and gate
                # noise draw the same values in the recomputation.
                x_BLD, layer_decisions, kv = torch.utils.checkpoint.checkpoint(
                    layer, x_BLD, ctx, allowed_BHLM, cache, keep_kv, f"layers.{i}", role, use_reentrant=False
                )
            else:
                x_BLD, layer_decisions, kv = layer(
                    x_BLD, ctx, allowed_BHLM, cache, keep_kv, name=f"layers.{i}", role=role
                )
            decisions.extend(layer_decisions)
            if new_caches is not None:
                new_caches.append(kv)
        return EncoderOutput(x_BLD, decisions, new_caches)


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
