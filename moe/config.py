"""Typed settings of one conditional-MoE sublayer.

`MoEConfig` is a plain dataclass so that any config system (ours in `uniperceiver.config`, or a
user's own) can build it; every cross-field rule is checked in `__post_init__`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RouterKind = Literal["attribute", "task", "modality", "token", "context"]
# Routers whose decision depends only on per-segment ids/attributes, never on token features:
# every token of a segment shares one decision, so their experts can be merged (moe.merge).
DATA_INDEPENDENT_ROUTERS = ("attribute", "task", "modality")


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
    # task / modality routers: size of their id embedding tables
    num_tasks: int = 16
    num_modalities: int = 3
    # "softmax_topk": softmax over all E logits, keep top-k, renormalise (the release);
    # "topk_softmax": keep the top-k logits and softmax over those k only.
    gate_order: Literal["softmax_topk", "topk_softmax"] = "softmax_topk"
    # "gaussian": logits + N(0, (noise_std / num_experts)^2) (the release's "vmoe");
    # "jitter": token features multiplied by U(1 - eps, 1 + eps) (Switch), token/context only;
    # "none": deterministic.
    noise: Literal["none", "gaussian", "jitter"] = "gaussian"
    noise_std: float = 1.0
    jitter_eps: float = 0.01
    # Token dispatch (token/context routers only).
    capacity_factor_train: float = 1.25
    capacity_factor_eval: float = 2.0
    min_capacity: int = 4
    dropless: bool = False
    batch_prioritized: bool = False
    # Auxiliary losses: weights applied by the caller; values are always returned.
    load_balance_weight: float = 0.0
    z_loss_weight: float = 0.0
    # "auto": Tutel on CUDA when importable, else native torch.
    backend: Literal["auto", "torch", "tutel"] = "auto"

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
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

    @property
    def data_independent(self) -> bool:
        """True when every token of a segment shares one routing decision."""
        return self.router in DATA_INDEPENDENT_ROUTERS
