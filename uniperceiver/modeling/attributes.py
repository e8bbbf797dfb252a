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

_VISUAL_INPUT = (1, 0, 0, 1, 1, 0, 0, 0)
_TEXT_INPUT = (0, 1, 0, 1, 0, 1, 0, 0)
_CAPTION_VISUAL = (1, 1, 0, 1, 1, 0, 0, 0)
_CAPTION_TEXT = (1, 1, 0, 1, 0, 1, 0, 1)
_VISUAL_TASK_TARGET = (1, 0, 0, 1, 0, 1, 1, 0)  # class names, retrieval captions
_TEXT_TASK_TARGET = (1, 1, 0, 1, 0, 1, 1, 0)  # vocabulary, verbalisers

# (task type, role) -> one row per segment of that sequence.
_TABLE: dict[tuple[str, str], tuple[tuple[int, ...], ...]] = {
    ("image_classification", "input"): (_VISUAL_INPUT,),
    ("video_classification", "input"): (_VISUAL_INPUT,),
    ("image_retrieval", "input"): (_VISUAL_INPUT,),
    ("video_retrieval", "input"): (_VISUAL_INPUT,),
    ("text_mlm", "input"): (_TEXT_INPUT,),
    ("text_classification", "input"): (_TEXT_INPUT,),
    ("image_caption", "input"): (_CAPTION_VISUAL, _CAPTION_TEXT),
    ("video_caption", "input"): (_CAPTION_VISUAL, _CAPTION_TEXT),
    ("image_retrieval", "target"): (_VISUAL_TASK_TARGET,),
    ("video_retrieval", "target"): (_VISUAL_TASK_TARGET,),
}

# Shared target sets carry the row of the set, not of the task using it.
_TARGET_SET_ROWS: dict[str, tuple[int, ...]] = {
    "class_names": _VISUAL_TASK_TARGET,  # ImageNet1k/22k, Kinetics, MomentsInTime
    "vocabulary": _TEXT_TASK_TARGET,  # Vocab_Word
    "verbalizer": _TEXT_TASK_TARGET,  # GLUE '*-target' sets
}

TASK_TYPES = tuple(sorted({task for task, _ in _TABLE}))
TARGET_SET_KINDS = tuple(_TARGET_SET_ROWS)


def task_attributes(task_type: str, role: str = "input") -> Tensor:
    """Rows [S, 8] for a task's input (or per-sample target) sequence."""
    try:
        rows = _TABLE[(task_type, role)]
    except KeyError:
        known = sorted(f"{t}/{r}" for t, r in _TABLE)
        raise KeyError(f"no attribute rows for task type {task_type!r} role {role!r}; known: {known}") from None
    return torch.tensor(rows, dtype=torch.float32)


def target_set_attributes(kind: str) -> Tensor:
    """Row [1, 8] for a shared target set of this kind (class_names, vocabulary, verbalizer)."""
    try:
        return torch.tensor([_TARGET_SET_ROWS[kind]], dtype=torch.float32)
    except KeyError:
        raise KeyError(f"unknown target set kind {kind!r}; known: {list(_TARGET_SET_ROWS)}") from None
