"""The shared pre-LN Transformer encoder with layer scale, drop path and MoE sublayers.

Shape legend: B batch, L query length, M key/value length (history + new tokens), D model width,
H heads, Dh head width, F FFN width.

Every sublayer linear (qkv, attention out, fc1, fc2) is either a dense nn.Linear or a
`moe.MoELinear`; routing context arrives as an argument on every call (never a global), and the
routing decisions of the call are returned so callers can log or check them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from moe import MoELinear, RoutingContext, SegmentDecision

from ..config.model import ModelConfig


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
    ) -> tuple[Tensor, list[tuple[str, SegmentDecision]], LayerCache | None]:
        """`allowed_BHLM` (bool, True = may attend; broadcastable) masks attention. With `cache`,
        the new tokens attend to the cached keys/values followed by their own."""
        decisions: list[tuple[str, SegmentDecision]] = []
        b, length, d = x_BLD.shape
        h, dh = self.num_heads, d // self.num_heads

        qkv_BL3D, attn_decision = _linear(self.qkv, self.norm1(x_BLD), ctx, None)
        if attn_decision is not None:
            decisions.append((f"{name}.qkv", attn_decision))
        q_BHLd, k_BHLd, v_BHLd = qkv_BL3D.view(b, length, 3, h, dh).permute(2, 0, 3, 1, 4)
        new_kv = LayerCache(k_BHLd, v_BHLd) if keep_kv else None
        if cache is not None:
            k_BHLd = torch.cat([cache.key_BHMd, k_BHLd], dim=2)
            v_BHLd = torch.cat([cache.value_BHMd, v_BHLd], dim=2)
        attn_BHLd = F.scaled_dot_product_attention(q_BHLd, k_BHLd, v_BHLd, attn_mask=allowed_BHLM)
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
    ) -> EncoderOutput:
        decisions: list[tuple[str, SegmentDecision]] = []
        new_caches: list[LayerCache] | None = [] if keep_kv else None
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # Non-reentrant checkpointing replays the saved RNG state, so drop path and gate
                # noise draw the same values in the recomputation.
                x_BLD, layer_decisions, kv = torch.utils.checkpoint.checkpoint(
                    layer, x_BLD, ctx, allowed_BHLM, cache, keep_kv, f"layers.{i}", use_reentrant=False
                )
            else:
                x_BLD, layer_decisions, kv = layer(
                    x_BLD, ctx, allowed_BHLM, cache, keep_kv, name=f"layers.{i}"
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
