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
        # Prompt tuning's FC prompt (OFFICIAL.md 1.5): logit = w * logit + fc_prompt(feature).
        prompt = cfg.prompt
        self.fc_prompt = nn.Linear(cfg.d_model, prompt.fc_prompt_out) if prompt.fc else None
        self.similarity_weight: nn.Parameter | float | None = None
        if prompt.fc:
            self.similarity_weight = (
                nn.Parameter(torch.tensor(float(prompt.similarity_weight_value)))
                if prompt.similarity_weight == "learn" else float(prompt.similarity_weight_value)
            )

    def project_raw(self, x_XD: Tensor) -> Tensor:
        """proj(ln_post(x)): the feature before L2 normalisation (what the FC prompt reads)."""
        return self.proj(self.ln_post(x_XD))

    def project(self, x_XD: Tensor) -> Tensor:
        """Unit-norm features of encoder outputs (inputs and targets alike)."""
        return F.normalize(self.project_raw(x_XD).float(), dim=-1)

    def add_fc_prompt(self, logits_XN: Tensor, raw_XD: Tensor, task: str = "") -> Tensor:
        """similarity_weight * logits + fc_prompt(raw features) (the FC prompt must be built)."""
        if self.fc_prompt is None:
            raise RuntimeError("this model has no FC prompt (model.prompt.fc_prompt_out = 0)")
        if logits_XN.shape[-1] != self.fc_prompt.out_features:
            from ..config import ConfigError  # bad input (exit 2): a prompt config or adapter for another task

            raise ConfigError(
                f"task {task!r}: the FC prompt has {self.fc_prompt.out_features} outputs, the task has "
                f"{logits_XN.shape[-1]} classes (set model.prompt.fc_prompt_out, or model.prompt.fc_prompt_tasks "
                "to the tasks it was trained for)"
            )
        return self.similarity_weight * logits_XN + self.fc_prompt(raw_XD).float()

    def scale(self, name: str) -> Tensor:
        """exp(s), replaced by the constant cap above it (which also stops its gradient)."""
        if name not in self.logit_scale:
            raise KeyError(f"unknown temperature {name!r}; known: {list(self.logit_scale)}")
        s = self.logit_scale[name].float().exp()
        return torch.where(s > self.cap, torch.full_like(s, self.cap), s)

    def logits(self, feats_XD: Tensor, target_feats_ND: Tensor, temperature: str) -> Tensor:
        return self.scale(temperature) * (feats_XD @ target_feats_ND.t())
