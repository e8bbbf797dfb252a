"""Sample dicts -> the `TaskBatch` the task formulations consume (`uniperceiver/tasks`).

`TaskCollate` is the collate of one task: it calls its task type's `TaskSpec.collate`
(each kind documents its layout there) with itself, which offers the shared pieces: `need`
(a key every sample must have), `visual` / `single_view` (the visual segment), `captions`
(tokenized `caption + " <|endoftext|>"`, truncated to task.max_text_len keeping the last id),
`rows` / `seq` (a `Sequence` routed with the type's attribute rows) and `batch` (the
`TaskBatch`). Text is right-padded with 0, `padding_mask` True at padding. `meta['ids']` lists
the sample ids; `meta['skipped']` counts samples that readers replaced because their media could
not be read (`on_error: skip`), also from workers.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..config.schema import TaskConfig
from ..modeling.attributes import task_attributes
from ..modeling.batch import Segment, Sequence, TaskBatch
from ..tokenization import ClipTokenizer, pad_ids
from ..utils.task_registry import task_spec

__all__ = ["TaskCollate", "make_collate", "pad_ids"]


class TaskCollate:
    """`collate(samples) -> TaskBatch` for one task (picklable, for DataLoader workers)."""

    def __init__(self, task: TaskConfig, tokenizer: ClipTokenizer, training: bool, task_id: int = 0) -> None:
        self.task = task
        try:
            self.spec = task_spec(task.type)
        except ValueError as e:
            raise ValueError(f"task {task.name}: {e}") from None
        self.kind = self.spec.kind
        self.tokenizer = tokenizer
        self.training = training
        self.task_id = task_id

    def __call__(self, samples: list[dict[str, Any]]) -> TaskBatch:
        if not samples:
            raise ValueError(f"task {self.task.name}: cannot collate an empty batch")
        return self.spec.collate(self, samples)

    # ------------------------------------------------------------ pieces for the specs' collates
    def need(self, samples: list[dict[str, Any]], key: str) -> list[Any]:
        missing = [i for i, s in enumerate(samples) if key not in s]
        if missing:
            raise KeyError(f"task {self.task.name} ({self.task.type}, {'training' if self.training else 'eval'}): "
                           f"sample {missing[0]} has no {key!r} (keys: {sorted(samples[missing[0]])})")
        return [s[key] for s in samples]

    def visual(self, samples: list[dict[str, Any]]) -> tuple[Segment, int]:
        """The visual segment and the number of views per sample."""
        key = "video" if "video" in samples[0] else "image"
        data = torch.stack(self.need(samples, key))
        views = 1
        if key == "video" and data.dim() == 6:  # [B, V, T, 3, S, S] evaluation views
            views = data.shape[1]
            data = data.flatten(0, 1)
        return Segment(key, data), views

    def single_view(self, samples: list[dict[str, Any]]) -> Segment:
        seg, views = self.visual(samples)
        if views > 1:
            raise ValueError(f"task {self.task.name}: multi-view inputs ({views} views) are for video "
                             "classification; set eval_clips = eval_crops = 1")
        return seg

    def captions(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        seqs = self.tokenizer.encode_texts(texts, append_eot=True, max_len=self.task.max_text_len)
        return pad_ids(seqs)

    def rows(self, role: str = "input") -> Tensor:
        """The type's attribute rows [S, 8] for `role`."""
        return task_attributes(self.task.type, role)

    def seq(self, segments: list[Segment], role: str = "input", rows: Tensor | None = None, **kw: Any) -> Sequence:
        attrs = self.rows(role) if rows is None else rows
        return Sequence(segments, attributes_SA=attrs, task_id=self.task_id, **kw)

    def batch(self, samples: list[dict[str, Any]], inputs: Sequence, **kw: Any) -> TaskBatch:
        meta = kw.pop("meta", {})
        meta["ids"] = [s.get("id") for s in samples]
        meta["skipped"] = int(sum(s.get("skipped", 0) for s in samples))
        return TaskBatch(
            task=self.task.name,
            kind=self.kind,
            temperature=self.task.temperature,
            inputs=inputs,
            loss_weight=self.task.loss_weight,
            label_smoothing=self.task.label_smoothing,
            meta=meta,
            **kw,
        )


def make_collate(task: TaskConfig, tokenizer: ClipTokenizer, training: bool,
                 task_id: int = 0) -> Callable[[list[dict[str, Any]]], TaskBatch]:
    """The collate function of one task (its TaskSpec's collate, with the pieces above)."""
    return TaskCollate(task, tokenizer, training, task_id)
