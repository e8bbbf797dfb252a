"""Sample dicts -> the `TaskBatch` the task formulations consume (`uniperceiver/tasks`).

Layouts (B samples; text right-padded with 0, `padding_mask` True at padding):
- classification: visual segment [B, T, 3, S, S]; `labels` [B]; `target_set` = task.target_set.
  Multi-view video evaluation ([V, T, ...] per sample) flattens to B*V rows, sample-major (row
  b*V + v), `labels` repeated per view, `meta['views'] = V` (average the softmax over each
  sample's V rows).
- text classification: text ids [B, L], `spe_index` [B] (position of `<|spe|>` in the text).
- mlm: text ids [B, L]; `labels` [B, L] (original ids where masked, -1 elsewhere and at padding).
- retrieval, training: visual input; `targets` = one caption per sample [B, L] (attribute role
  'target'). Evaluation: every caption of every sample in `targets`, `target_owner` [N] = the
  index of the sample it belongs to.
- caption, training (`caption_queries=True`): visual segment + text segment
  `[caption + EOT (padded to T) ; <|spe|> x len (padded to T)]` of length 2T, positions
  `[0..T-1, 0..T-1]`, padding masked in both halves; `labels` [B, T] = the caption ids, -1 at
  padding. Evaluation: the visual segment only, `decode_attributes_SA` = the caption-text row.
Captions are tokenized here as `caption + " <|endoftext|>"`, truncated to task.max_text_len
keeping the last id. `meta['ids']` lists the sample ids; `meta['skipped']` counts samples that
readers replaced because their media could not be read (`on_error: skip`), also from workers.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..config.schema import TaskConfig
from ..modeling.attributes import task_attributes
from ..modeling.batch import TASK_KINDS, Segment, Sequence, TaskBatch
from ..tokenization import ClipTokenizer, pad_ids

__all__ = ["TASK_KINDS", "TaskCollate", "make_collate", "pad_ids"]


class TaskCollate:
    """`collate(samples) -> TaskBatch` for one task (picklable, for DataLoader workers)."""

    def __init__(self, task: TaskConfig, tokenizer: ClipTokenizer, training: bool, task_id: int = 0) -> None:
        if task.type not in TASK_KINDS:
            raise ValueError(f"task {task.name}: unknown task type {task.type!r}")
        self.task = task
        self.kind = TASK_KINDS[task.type]
        self.tokenizer = tokenizer
        self.training = training
        self.task_id = task_id

    # ------------------------------------------------------------ pieces
    def _need(self, samples: list[dict[str, Any]], key: str) -> list[Any]:
        missing = [i for i, s in enumerate(samples) if key not in s]
        if missing:
            raise KeyError(f"task {self.task.name} ({self.task.type}, {'training' if self.training else 'eval'}): "
                           f"sample {missing[0]} has no {key!r} (keys: {sorted(samples[missing[0]])})")
        return [s[key] for s in samples]

    def _visual(self, samples: list[dict[str, Any]]) -> tuple[Segment, int]:
        """The visual segment and the number of views per sample."""
        key = "video" if "video" in samples[0] else "image"
        data = torch.stack(self._need(samples, key))
        views = 1
        if key == "video" and data.dim() == 6:  # [B, V, T, 3, S, S] evaluation views
            views = data.shape[1]
            data = data.flatten(0, 1)
        return Segment(key, data), views

    def _captions(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        seqs = self.tokenizer.encode_texts(texts, append_eot=True, max_len=self.task.max_text_len)
        return pad_ids(seqs)

    def _batch(self, samples: list[dict[str, Any]], inputs: Sequence, **kw: Any) -> TaskBatch:
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

    def _seq(self, segments: list[Segment], role: str = "input", rows: Tensor | None = None, **kw: Any) -> Sequence:
        attrs = task_attributes(self.task.type, role) if rows is None else rows
        return Sequence(segments, attributes_SA=attrs, task_id=self.task_id, **kw)

    # ------------------------------------------------------------- kinds
    def __call__(self, samples: list[dict[str, Any]]) -> TaskBatch:
        if not samples:
            raise ValueError(f"task {self.task.name}: cannot collate an empty batch")
        return getattr(self, f"_collate_{self.kind}")(samples)

    def _collate_classification(self, samples: list[dict[str, Any]]) -> TaskBatch:
        seg, views = self._visual(samples)
        labels = torch.tensor(self._need(samples, "label"), dtype=torch.long)
        meta: dict[str, Any] = {"views": views}
        if views > 1:
            meta["sample_labels"] = labels
            labels = labels.repeat_interleave(views)
        return self._batch(samples, self._seq([seg]), labels=labels, target_set=self.task.target_set, meta=meta)

    def _collate_text_classification(self, samples: list[dict[str, Any]]) -> TaskBatch:
        ids, mask = pad_ids(self._need(samples, "ids"))
        return self._batch(
            samples,
            self._seq([Segment("text", ids, mask)]),
            labels=torch.tensor(self._need(samples, "label"), dtype=torch.long),
            spe_index=torch.tensor(self._need(samples, "spe_index"), dtype=torch.long),
            target_set=self.task.target_set,
        )

    def _collate_mlm(self, samples: list[dict[str, Any]]) -> TaskBatch:
        ids, mask = pad_ids(self._need(samples, "ids"))
        labels, _ = pad_ids(self._need(samples, "mlm_labels"), pad=-1)
        if labels.shape != ids.shape:
            raise ValueError(f"task {self.task.name}: mlm_labels and ids differ in length")
        return self._batch(samples, self._seq([Segment("text", ids, mask)]), labels=labels,
                           target_set=self.task.target_set)

    def _single_view(self, samples: list[dict[str, Any]]) -> Segment:
        seg, views = self._visual(samples)
        if views > 1:
            raise ValueError(f"task {self.task.name}: multi-view inputs ({views} views) are for video "
                             "classification; set eval_clips = eval_crops = 1")
        return seg

    def _collate_retrieval(self, samples: list[dict[str, Any]]) -> TaskBatch:
        seg = self._single_view(samples)
        inputs = self._seq([seg])
        if self.training:
            ids, mask = self._captions(self._need(samples, "caption"))
            targets = self._seq([Segment("text", ids, mask)], role="target")
            return self._batch(samples, inputs, targets=targets)
        per_sample = self._need(samples, "captions")
        flat = [c for caps in per_sample for c in caps]
        owner = torch.tensor([i for i, caps in enumerate(per_sample) for _ in caps], dtype=torch.long)
        ids, mask = self._captions(flat)
        targets = self._seq([Segment("text", ids, mask)], role="target")
        return self._batch(samples, inputs, targets=targets, target_owner=owner, meta={"captions": per_sample})

    def _collate_caption(self, samples: list[dict[str, Any]]) -> TaskBatch:
        seg = self._single_view(samples)
        rows = task_attributes(self.task.type, "input")  # [visual row, caption-text row]
        if not self.training:
            meta = {"captions": [s.get("captions") for s in samples]}
            return self._batch(samples, self._seq([seg], rows=rows[:1]), decode_attributes_SA=rows[1:],
                               target_set=self.task.target_set, meta=meta)
        seqs = self.tokenizer.encode_texts(self._need(samples, "caption"), append_eot=True,
                                           max_len=self.task.max_text_len)
        words, word_mask = pad_ids(seqs)
        queries, query_mask = pad_ids([[ClipTokenizer.SPE] * len(s) for s in seqs])
        labels, _ = pad_ids(seqs, pad=-1)
        t = words.shape[1]
        text = Segment("text", torch.cat([words, queries], 1), torch.cat([word_mask, query_mask], 1),
                       positions=torch.arange(t).repeat(2))
        inputs = self._seq([seg, text], rows=rows, caption_queries=True)
        return self._batch(samples, inputs, labels=labels, target_set=self.task.target_set)


def make_collate(task: TaskConfig, tokenizer: ClipTokenizer, training: bool,
                 task_id: int = 0) -> Callable[[list[dict[str, Any]]], TaskBatch]:
    """The collate function of one task (see the module docstring for the layouts)."""
    return TaskCollate(task, tokenizer, training, task_id)
