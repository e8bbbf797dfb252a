"""Task formulations: every task is similarity between encoded inputs and encoded targets."""
from __future__ import annotations

from torch import Tensor

from ..modeling.batch import TaskBatch
from ..modeling.model import UniPerceiver
from .base import TaskOutput
from .captioning import BeamSearchOutput, beam_search, caption_loss
from .classification import classify
from .losses import accuracy, cross_entropy
from .mlm import masked_lm
from .retrieval import retrieve

__all__ = [
    "BeamSearchOutput",
    "TaskOutput",
    "accuracy",
    "beam_search",
    "caption_loss",
    "classify",
    "cross_entropy",
    "masked_lm",
    "retrieve",
    "run_task",
]


def run_task(
    model: UniPerceiver,
    batch: TaskBatch,
    target_feats: dict[str, Tensor] | None = None,
    temporal_offsets: list[int] | None = None,
) -> TaskOutput:
    """Forward one task batch; `target_feats` maps target-set names to encoded features."""
    def feats() -> Tensor:
        if batch.target_set is None or target_feats is None or batch.target_set not in target_feats:
            raise KeyError(f"task {batch.task}: features of target set {batch.target_set!r} were not given")
        return target_feats[batch.target_set]

    if batch.kind in ("classification", "text_classification"):
        return classify(model, batch, feats(), temporal_offsets)
    if batch.kind == "mlm":
        return masked_lm(model, batch, feats())
    if batch.kind == "caption":
        return caption_loss(model, batch, feats(), temporal_offsets)
    if batch.kind == "retrieval":
        return retrieve(model, batch, temporal_offsets)
    raise ValueError(f"unknown task kind {batch.kind!r}")
