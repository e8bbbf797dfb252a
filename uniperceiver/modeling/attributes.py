"""The 8-bit attribute rows that route the released attribute-MoE (OFFICIAL.md 2.5).

Bits (our reading, consistent with every row of the release):
  0-3  task modalities: input has vision, input has text, target has vision, target has text
  4-5  modality of the current segment: vision, text
  6    the segment belongs to a target sequence
  7    causal (autoregressive caption text)
"""
from __future__ import annotations

import torch
from torch import Tensor

VISUAL_INPUT = (1, 0, 0, 1, 1, 0, 0, 0)
TEXT_INPUT = (0, 1, 0, 1, 0, 1, 0, 0)
CAPTION_VISUAL = (1, 1, 0, 1, 1, 0, 0, 0)
CAPTION_TEXT = (1, 1, 0, 1, 0, 1, 0, 1)
VISUAL_TASK_TARGET = (1, 0, 0, 1, 0, 1, 1, 0)  # class names, retrieval captions
TEXT_TASK_TARGET = (1, 1, 0, 1, 0, 1, 1, 0)  # vocabulary, verbalisers

# The rows of each task type's sequences are part of its TaskSpec (`uniperceiver/tasks/`).
# Shared target sets carry the row of the set, not of the task using it.
_TARGET_SET_ROWS: dict[str, tuple[int, ...]] = {
    "class_names": VISUAL_TASK_TARGET,  # ImageNet1k/22k, Kinetics, MomentsInTime
    "vocabulary": TEXT_TASK_TARGET,  # Vocab_Word
    "verbalizer": TEXT_TASK_TARGET,  # GLUE '*-target' sets
}

TARGET_SET_KINDS = tuple(_TARGET_SET_ROWS)


def task_attributes(task_type: str, role: str = "input") -> Tensor:
    """Rows [S, 8] for a task's input (or per-sample target) sequence (from its TaskSpec)."""
    from ..utils.task_registry import task_spec

    try:
        rows = task_spec(task_type).attribute_rows(role)  # type: ignore[arg-type]
    except ValueError as e:
        raise KeyError(str(e)) from None
    return torch.tensor(rows, dtype=torch.float32)


def target_set_attributes(kind: str) -> Tensor:
    """Row [1, 8] for a shared target set of this kind (class_names, vocabulary, verbalizer)."""
    try:
        return torch.tensor([_TARGET_SET_ROWS[kind]], dtype=torch.float32)
    except KeyError:
        raise KeyError(f"unknown target set kind {kind!r}; known: {list(_TARGET_SET_ROWS)}") from None
