"""What every task formulation returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from moe import Decision


@dataclass
class TaskOutput:
    """`losses` are already multiplied by the task's loss weight (as the release logs them);
    `metrics` carry no gradient; `logits` / `extras` are what evaluation consumes."""

    losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    decisions: list[tuple[str, Decision]] = field(default_factory=list)

    @property
    def loss(self) -> Tensor:
        return sum(self.losses.values())  # type: ignore[return-value]


def word_logits(model: Any, hidden_BTD: Tensor, labels_BT: Tensor, vocab_feats_VD: Tensor,
                temperature: str) -> tuple[Tensor, Tensor]:
    """Logits over the vocabulary [X, V] of the positions whose label is not -1 (row-major over
    (sample, position), as the release) and their labels [X]: MLM and caption training share it."""
    labels_BT = labels_BT.to(hidden_BTD.device)
    valid_BT = labels_BT != -1
    hidden_XD = hidden_BTD[valid_BT]
    return model.logits(model.features(hidden_XD), vocab_feats_VD, temperature), labels_BT[valid_BT]


def word_prediction_output(model: Any, batch: Any, hidden_BTD: Tensor, vocab_feats_VD: Tensor, loss_name: str,
                           decisions: list) -> TaskOutput:
    """The weighted CE and accuracy of predicting `batch.labels` [B, T] at `hidden_BTD`."""
    from .losses import accuracy, cross_entropy

    logits_XV, targets_X = word_logits(model, hidden_BTD, batch.labels, vocab_feats_VD, batch.temperature)
    out = TaskOutput(logits=logits_XV, decisions=decisions)
    out.losses[loss_name] = batch.loss_weight * cross_entropy(logits_XV, targets_X, batch.label_smoothing)
    out.metrics["accuracy"] = accuracy(logits_XV, targets_X)
    return out
