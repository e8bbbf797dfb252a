"""What every evaluator is (OFFICIAL.md 4.3); each task kind defines its own next to its
formulation (`uniperceiver/tasks/`), and its `TaskSpec` names it.

An evaluator turns each collated eval batch into one record per sample (`process`), and turns the
records of the whole set, in sample-index order, into metrics (`summarize`). Records hold only
what the metric needs (a rank, a caption, features), so gathering them across ranks is cheap and
the metrics cannot depend on how the samples were batched or sharded.

The built-in ones: `tasks.classification.ClassificationEvaluator` (top-1/top-5, softmax averaged
over the views of a sample), `tasks.retrieval.RetrievalEvaluator` (R@1/5/10 both ways, chunked),
`tasks.captioning.CaptionEvaluator` (beam search, BLEU/METEOR/ROUGE-L/CIDEr(/SPICE)),
`tasks.mlm.MLMEvaluator` (top-1 of the masked words).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..config.schema import TaskConfig
from ..modeling.batch import TargetSet, TaskBatch
from ..modeling.model import UniPerceiver
from ..utils.task_registry import task_spec
from ..utils.errors import BadInput
from .target_features import TargetFeatures

__all__ = ["EvalInputError", "Evaluator", "TaskResult", "eval_labels", "evaluator_for", "jsonable"]


class EvalInputError(ValueError, BadInput):
    """Bad evaluation input (checkpoint, target set, data); the message names the file and what
    was expected."""


@dataclass
class TaskResult:
    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)
    # per-sample outputs worth saving (captions), in sample-index order
    predictions: list[dict[str, Any]] | None = None


@dataclass
class Evaluator:
    """Base: the task, the model, and (for shared-set tasks) its target set and feature store."""

    task: TaskConfig
    model: UniPerceiver
    target_set: TargetSet | None = None
    target_source: str = ""  # where the set came from, for error messages (file or 'inline names')
    features: TargetFeatures | None = None
    chunk_size: int = 4096

    def check_dataset(self, dataset: Any) -> None:
        """Consistency checks before the (expensive) loop."""

    def process(self, indices: list[int], infos: list[dict], batch: TaskBatch) -> list[tuple[int, Any]]:
        raise NotImplementedError

    def summarize(self, records: list[Any]) -> TaskResult:
        raise NotImplementedError

    def target_features(self) -> Tensor:
        if self.target_set is None or self.features is None:
            raise EvalInputError(f"task {self.task.name!r} ({self.task.type}) needs a target set")
        return self.features.get(self.target_set)


def eval_labels(task: TaskConfig, infos: list[dict], batch: TaskBatch, b: int) -> Tensor:
    if all("label" in i for i in infos):
        return torch.tensor([int(i["label"]) for i in infos], dtype=torch.long)
    if batch.labels is not None and batch.labels.dim() == 1:
        labels = batch.labels.cpu().long()
        return labels if labels.shape[0] == b else labels.view(b, -1)[:, 0]
    raise EvalInputError(f"task {task.name!r}: eval samples carry no 'label'")


def evaluator_for(task: TaskConfig, **kwargs: Any) -> Evaluator:
    """The evaluator its task spec names; `tokenizer`, `spice`, `scorers` are set when given."""
    try:
        cls = task_spec(task.type).evaluator
    except ValueError as e:
        raise EvalInputError(f"task {task.name!r}: {e}") from None
    extra = {k: kwargs.pop(k) for k in ("tokenizer", "spice", "scorers") if k in kwargs}
    ev = cls(task=task, **kwargs)
    for k, v in extra.items():
        setattr(ev, k, v)
    return ev


def jsonable(x: Any) -> Any:
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return str(x)
