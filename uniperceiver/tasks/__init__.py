"""Task formulations: every task is similarity between encoded inputs and encoded targets.

Each task type is a `TaskSpec` (`uniperceiver/utils/task_registry.py`) declared by the module of its kind:
`classification.py` (image/video classification, text classification), `retrieval.py`,
`mlm.py`, `captioning.py` (+ beam search). `run_task` forwards a batch through its kind's spec.
The registry sits below config, data, modeling and evaluation (they look specs up there);
the formulations load on first use.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..utils.task_registry import TaskSpec, all_specs, kind_spec, register, registered, task_spec, task_types

if TYPE_CHECKING:
    from torch import Tensor

    from ..modeling.batch import TaskBatch
    from ..modeling.model import UniPerceiver
    from .base import TaskOutput

__all__ = [
    "BeamSearchOutput",
    "TaskOutput",
    "TaskSpec",
    "accuracy",
    "all_specs",
    "beam_search",
    "caption_loss",
    "classify",
    "cross_entropy",
    "kind_spec",
    "masked_lm",
    "register",
    "registered",
    "retrieve",
    "run_task",
    "task_spec",
    "task_types",
]

_LAZY = {
    "BeamSearchOutput": "captioning", "beam_search": "captioning", "caption_loss": "captioning",
    "TaskOutput": "base", "accuracy": "losses", "cross_entropy": "losses", "classify": "classification",
    "masked_lm": "mlm", "retrieve": "retrieval",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_task(
    model: UniPerceiver,
    batch: TaskBatch,
    target_feats: dict[str, Tensor] | None = None,
    temporal_offsets: list[int] | None = None,
    gather_negatives: Callable[[Tensor], Tensor] | None = None,
) -> TaskOutput:
    """Forward one task batch; `target_feats` maps target-set names to encoded features.
    `gather_negatives(feats)` (single-task training on several ranks): the other ranks' copies of
    `feats` without gradient, for the kinds whose spec takes them (`TaskSpec.gathers_negatives`:
    retrieval's in-batch negatives, the release's FEATURE_GATHER)."""
    spec = kind_spec(batch.kind)
    feats = None
    if spec.needs_target_set:
        if batch.target_set is None or target_feats is None or batch.target_set not in target_feats:
            raise KeyError(f"task {batch.task}: features of target set {batch.target_set!r} were not given")
        feats = target_feats[batch.target_set]
    if gather_negatives is not None and spec.gathers_negatives:
        return spec.forward(model, batch, feats, temporal_offsets, gather_negatives=gather_negatives)
    return spec.forward(model, batch, feats, temporal_offsets)
