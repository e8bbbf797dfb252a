"""Typed settings of one conditional-MoE sublayer.

`MoEConfig` is a plain dataclass so that any config system (ours in `uniperceiver.config`, or a
user's own) can build it; every cross-field rule is checked in `__post_init__`, and every error
names the offending field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

RouterKind = Literal["attribute", "task", "modality", "token", "context", "lookup"]
ROUTERS = ("attribute", "task", "modality", "token", "context", "lookup")
# Routers whose decision depends only on per-segment ids/attributes, never on token features:
# every token of a segment shares one decision, so their experts can be merged (moe.merge).
# "lookup" is the parameter-free router of a per-task export: attribute row r -> expert r.
DATA_INDEPENDENT_ROUTERS = ("attribute", "task", "modality", "lookup")
# Routers that decide per token and therefore need token dispatch (moe.dispatch).
TOKEN_ROUTERS = ("token", "context")
BACKENDS = ("auto", "torch", "tutel")
EXECUTIONS = ("auto", "sorted", "static")
EXPERT_TYPES = ("linear", "ffn")


@dataclass
class MoEConfig:
    """One MoE sublayer's routing and execution settings.

    Defaults reproduce the released Uni-Perceiver-MoE (attribute router, 8 experts, top-2,
    softmax over all experts then top-k and renormalise, Gaussian logit noise of
    std = noise_std / num_experts in training only, no capacity, no auxiliary loss).
    """

    num_experts: int = 8
    top_k: int = 2
    router: RouterKind = "attribute"
    # attribute router: width of the 0/1 attribute row (OFFICIAL.md 2.5)
    attribute_dim: int = 8
    # lookup router: the attribute row each expert serves (expert r <- row r, gate 1, top_k 1)
    lookup_rows: list[list[float]] | None = None
    # task / modality routers: size of their id embedding tables
    num_tasks: int = 16
    num_modalities: int = 3
    # "softmax_topk": softmax over all E logits, keep top-k, renormalise (the release);
    # "topk_softmax": keep the top-k logits and softmax over those k only.
    gate_order: Literal["softmax_topk", "topk_softmax"] = "softmax_topk"
    # "gaussian": logits + N(0, (noise_std / num_experts)^2) (the release's "vmoe");
    # "jitter": router input multiplied by U(1 - eps, 1 + eps) (Switch), token/context only;
    # "none": deterministic. Noise is applied in training only.
    noise: Literal["none", "gaussian", "jitter"] = "gaussian"
    noise_std: float = 1.0
    jitter_eps: float = 0.01
    # Token dispatch (token/context routers, and whole-FFN experts under any router).
    # capacity per expert = max(min_capacity, ceil(capacity_factor * tokens * top_k / experts)).
    capacity_factor_train: float = 1.25
    capacity_factor_eval: float = 2.0
    min_capacity: int = 4
    # dropless: every routed token is computed, whatever the imbalance (no capacity).
    dropless: bool = False
    # batch-prioritized routing (V-MoE): when an expert overflows, keep the tokens with the
    # highest top-1 gate instead of the earliest ones.
    batch_prioritized: bool = False
    # Benchmark switch: ignore the router's choice and send token t's k-th slot to expert
    # (t * top_k + k) % num_experts, so the layer is measured without router imbalance. The
    # router still runs and its gates still carry gradients.
    uniform_routing: bool = False
    # Auxiliary losses: weights applied by `moe.losses.weighted_aux_loss`; values are always
    # returned on the decision, whatever the weight.
    load_balance_weight: float = 0.0
    z_loss_weight: float = 0.0
    # "auto": Tutel on CUDA when importable, else native torch.
    backend: Literal["auto", "torch", "tutel"] = "auto"
    # For `MoEFFN`: "linear" merges/dispatches fc1 and fc2 separately with one shared decision
    # (the released model: GELU(x W1_bar) W2_bar); "ffn" makes every expert a whole FFN and
    # computes the exact mixture sum_k g_k FFN_{e_k}(x).
    expert_type: Literal["linear", "ffn"] = "linear"
    # How routed work is laid out (same results either way, to float rounding):
    # "sorted": only the kept slots as variable-size row blocks, merged weights built by a
    #   hand-written kernel (the CPU fast path; reads per-expert counts on the host once per plan);
    # "static": device-resident, static shapes, no host sync (capacity-padded buffers or grouped
    #   GEMMs, see `moe.static`; merged weights by device indexing): the GPU / torch.compile path;
    # "auto": "static" on CUDA and while torch.compile traces, "sorted" elsewhere. Expert
    #   parallelism always runs "sorted" (its all-to-all sizes are host values).
    execution: Literal["auto", "sorted", "static"] = "auto"

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        if self.gate_order not in ("softmax_topk", "topk_softmax"):
            raise ValueError(
                f"gate_order must be 'softmax_topk' or 'topk_softmax', got {self.gate_order!r}"
            )
        if self.noise not in ("none", "gaussian", "jitter"):
            raise ValueError(f"noise must be 'none', 'gaussian' or 'jitter', got {self.noise!r}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if not 0 <= self.jitter_eps < 1:
            raise ValueError(f"jitter_eps must be in [0, 1), got {self.jitter_eps}")
        if self.noise == "jitter" and self.data_independent:
            raise ValueError(
                f"noise='jitter' perturbs token features; router={self.router!r} sees none"
            )
        for name in ("capacity_factor_train", "capacity_factor_eval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}")
        for name in ("load_balance_weight", "z_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if self.expert_type not in EXPERT_TYPES:
            raise ValueError(f"expert_type must be one of {EXPERT_TYPES}, got {self.expert_type!r}")
        if self.router == "lookup":
            rows = self.lookup_rows or []
            if len(rows) != self.num_experts or any(len(r) != self.attribute_dim for r in rows):
                raise ValueError(
                    f"router='lookup' needs lookup_rows: num_experts={self.num_experts} rows of "
                    f"attribute_dim={self.attribute_dim} values"
                )
            if self.top_k != 1:
                raise ValueError(f"router='lookup' sends each row to one expert: top_k must be 1, got {self.top_k}")
        if self.uniform_routing and self.data_independent:
            raise ValueError(
                f"uniform_routing=True spreads tokens over experts; router={self.router!r} "
                "routes whole segments"
            )

    @property
    def data_independent(self) -> bool:
        """True when every token of a segment shares one routing decision."""
        return self.router in DATA_INDEPENDENT_ROUTERS

    def static_execution(self, device: torch.device) -> bool:
        """Whether this layer runs the device-resident static path on `device` (see `execution`)."""
        if self.execution != "auto":
            return self.execution == "static"
        return device.type == "cuda" or torch.compiler.is_compiling()

    def capacity_factor(self, training: bool) -> float:
        return self.capacity_factor_train if training else self.capacity_factor_eval

    def capacity(self, num_tokens: int, training: bool) -> int | None:
        """Slots per expert for `num_tokens` routed tokens; None = dropless (no limit)."""
        if self.dropless:
            return None
        slots = math.ceil(self.capacity_factor(training) * num_tokens * self.top_k / self.num_experts)
        return max(self.min_capacity, slots)
