"""Masked language modelling: the outputs at masked positions classified over the vocabulary;
evaluation scores the top-1 accuracy of the masked words."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..evaluation.evaluators import EvalInputError, Evaluator, TaskResult
from ..evaluation.metrics import rank_of_label
from ..modeling.attributes import TEXT_INPUT
from ..modeling.batch import Segment, TaskBatch
from ..modeling.model import UniPerceiver
from ..tokenization import pad_ids
from .base import TaskOutput, word_logits, word_prediction_output
from ..utils.task_registry import TaskSpec


def masked_lm(model: UniPerceiver, batch: TaskBatch, vocab_feats_VD: Tensor,
              temporal_offsets: list[int] | None = None) -> TaskOutput:
    """(`temporal_offsets` is for visual inputs; MLM has none.)"""
    if batch.labels is None:
        raise ValueError(f"task {batch.task}: MLM needs labels [B, L] (-1 where not masked)")
    enc = model.encode(batch.inputs)
    # Text tokens follow [SPE].
    hidden_BLD = enc.hidden_BLD[:, 1 : 1 + batch.labels.shape[1]]
    return word_prediction_output(model, batch, hidden_BLD, vocab_feats_VD, "mlm", enc.decisions)


def collate(c: Any, samples: list[dict[str, Any]]) -> TaskBatch:
    """Text ids [B, L]; `labels` [B, L] (original ids where masked, -1 elsewhere and at padding)."""
    ids, mask = pad_ids(c.need(samples, "ids"))
    labels, _ = pad_ids(c.need(samples, "mlm_labels"), pad=-1)
    if labels.shape != ids.shape:
        raise ValueError(f"task {c.task.name}: mlm_labels and ids differ in length")
    return c.batch(samples, c.seq([Segment("text", ids, mask)]), labels=labels, target_set=c.task.target_set)


class MLMEvaluator(Evaluator):
    """Top-1 accuracy of the masked words over the vocabulary (pessimistic ties)."""

    @torch.no_grad()
    def process(self, indices: list[int], infos: list[dict], batch: TaskBatch) -> list[tuple[int, Any]]:
        vocab_VD = self.target_features()
        if batch.labels is None:
            raise EvalInputError(f"task {self.task.name!r}: MLM eval batches need labels")
        assert self.target_set is not None
        batch = batch.with_vocabulary_rows(self.target_set)  # token ids -> rows of a vocabulary subset
        enc = self.model.encode(batch.inputs)
        labels_BL = batch.labels.to(enc.hidden_BLD.device)
        hidden_BLD = enc.hidden_BLD[:, 1 : 1 + labels_BL.shape[1]]
        records = []
        for i, idx in enumerate(indices):
            masked = labels_BL[i] != -1
            if not bool(masked.any()):
                records.append((idx, (0, 0)))
                continue
            # One sample at a time: the same products as ever, whatever the batch.
            logits_XV, targets_X = word_logits(self.model, hidden_BLD[i : i + 1], labels_BL[i : i + 1], vocab_VD,
                                               batch.temperature)
            correct = int((rank_of_label(logits_XV, targets_X) == 0).sum())
            records.append((idx, (correct, int(masked.sum()))))
        return records

    def summarize(self, records: list[Any]) -> TaskResult:
        correct = sum(c for c, _ in records)
        total = sum(t for _, t in records)
        if total == 0:
            raise EvalInputError(f"task {self.task.name!r}: no masked tokens in the evaluation set")
        return TaskResult({"accuracy": 100.0 * correct / total}, notes=[f"{total} masked tokens"])


SPECS = (
    TaskSpec("text_mlm", "mlm", "text", {"input": (TEXT_INPUT,)}, "text_mlm", formats=("mlm_corpus", "jsonl", "demo"),
             collate=collate, forward=masked_lm, evaluator=MLMEvaluator, target_sets=("vocabulary",),
             token_labels=True),
)
