"""Which parameters train: the release's freezing rule (OFFICIAL.md 1.5).

A parameter trains iff its name contains one of the configured substrings. A tensor registered
under several names is decided once, by the first name `named_parameters()` reports (the release
iterates the de-duplicated `named_parameters()`), so a shared tensor is never half frozen.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..config.model import RELEASE_PROMPT_TRAINABLE, ModelConfig


def trainable_substrings(model_cfg: ModelConfig, configured: Sequence[str] | None) -> list[str] | None:
    """The substring list in force: `train.trainable` when set; else the release's list when
    prompt tuning is on; else None (everything trains)."""
    if configured is not None:
        return list(configured)
    if model_cfg.prompt.enabled:
        return list(RELEASE_PROMPT_TRAINABLE)
    return None


def apply_trainable(model: nn.Module, substrings: Sequence[str] | None) -> list[str]:
    """Set `requires_grad` by the substring rule and return the names of the trainable tensors
    (first names, in `named_parameters()` order). `None` makes every parameter trainable."""
    decided: dict[int, bool] = {}
    trainable: list[str] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in decided:
            continue  # a second name of a tensor already decided by its first name
        trains = substrings is None or any(s in name for s in substrings)
        decided[id(param)] = trains
        param.requires_grad_(trains)
        if trains:
            trainable.append(name)
    return trainable


def trainable_names(model: nn.Module) -> list[str]:
    """Names (first names) of the parameters that currently require grad."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# Tensors that exist only in a prompt-tuned model (a base model file lacks them).
PROMPT_ONLY = ("embed.s_token_bias", "deep_prompt_embedding.", "predictor.fc_prompt.", "predictor.similarity_weight")


def is_prompt_only(name: str) -> bool:
    return name.startswith(PROMPT_ONLY) or any(p in name for p in PROMPT_ONLY[1:])
