"""Similarity predictor: cosine(proj(input), proj(target)) x a per-task temperature (OFFICIAL.md 3)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config.model import ModelConfig


class Predictor(nn.Module):
    """LN + Linear projection shared by inputs and targets, L2 normalisation, learned scales."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cap = cfg.temperature_cap
        self.ln_post = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        init = math.log(1.0 / cfg.temperature_init)
        self.logit_scale = nn.ParameterDict(
            {name: nn.Parameter(torch.tensor(init)) for name in cfg.temperatures}
        )

    def project(self, x_XD: Tensor) -> Tensor:
        """Unit-norm features of encoder outputs (inputs and targets alike)."""
        return F.normalize(self.proj(self.ln_post(x_XD)).float(), dim=-1)

    def scale(self, name: str) -> Tensor:
        """exp(s), replaced by the constant cap above it (which also stops its gradient)."""
        if name not in self.logit_scale:
            raise KeyError(f"unknown temperature {name!r}; known: {list(self.logit_scale)}")
        s = self.logit_scale[name].float().exp()
        return torch.where(s > self.cap, torch.full_like(s, self.cap), s)

    def logits(self, feats_XD: Tensor, target_feats_ND: Tensor, temperature: str) -> Tensor:
        return self.scale(temperature) * (feats_XD @ target_feats_ND.t())
