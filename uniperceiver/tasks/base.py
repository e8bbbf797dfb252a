"""What every task formulation returns."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from moe import SegmentDecision


@dataclass
class TaskOutput:
    """`losses` are already multiplied by the task's loss weight (as the release logs them);
    `metrics` carry no gradient; `logits` / `extras` are what evaluation consumes."""

    losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    decisions: list[tuple[str, SegmentDecision]] = field(default_factory=list)

    @property
    def loss(self) -> Tensor:
        return sum(self.losses.values())  # type: ignore[return-value]
