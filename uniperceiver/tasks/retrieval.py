"""Image/video-text retrieval: inputs and per-sample captions encoded by the same encoder.

Training uses in-batch negatives: label-smoothed CE over the B x B similarity in both directions
(image->text and its transpose), each weighted by the task's loss weight. With `gather_negatives`
(single-task training on several ranks, the release's FEATURE_GATHER, OFFICIAL.md 3.3) the other
ranks' features join as extra negatives without gradient, the local block first: B x (world * B).
Evaluation ranks every caption of the set for every input (and back): R@1/5/10 both ways, the
similarity in chunks.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..evaluation.evaluators import EvalInputError, Evaluator, TaskResult
from ..evaluation.metrics import retrieval_metrics, retrieval_ranks
from ..modeling.attributes import VISUAL_INPUT, VISUAL_TASK_TARGET
from ..modeling.batch import Segment, TaskBatch
from ..modeling.model import UniPerceiver
from .base import TaskOutput
from .losses import accuracy, cross_entropy
from ..utils.task_registry import TaskSpec


def retrieve(
    model: UniPerceiver,
    batch: TaskBatch,
    temporal_offsets: list[int] | None = None,
    gather_negatives: Callable[[Tensor], Tensor] | None = None,
) -> TaskOutput:
    """`gather_negatives(feats)`: the other ranks' copies of `feats`, concatenated, without
    gradient (training pairs only)."""
    if batch.targets is None:
        raise ValueError(f"task {batch.task}: retrieval needs per-sample target captions")
    enc = model.encode(batch.inputs, temporal_offsets=temporal_offsets)
    input_feats_BD = model.features(enc.hidden_BLD[:, 0])
    target_enc = model.encode(replace(batch.targets, role="target"))
    target_feats_ND = model.features(target_enc.hidden_BLD[:, 0])
    out = TaskOutput(extras={"input_feats": input_feats_BD, "target_feats": target_feats_ND},
                     decisions=enc.decisions + target_enc.decisions)
    if batch.target_owner is None:  # training pairs: caption i belongs to input i
        if target_feats_ND.shape[0] != input_feats_BD.shape[0]:
            raise ValueError(
                f"task {batch.task}: {input_feats_BD.shape[0]} inputs but {target_feats_ND.shape[0]} captions "
                "(pass target_owner for several captions per input)"
            )
        logits_BB = model.logits(input_feats_BD, target_feats_ND, batch.temperature)
        labels_B = torch.arange(logits_BB.shape[0], device=logits_BB.device)
        i2t_BX, t2i_BX = logits_BB, logits_BB.t()
        if gather_negatives is not None:
            all_targets_XD = torch.cat([target_feats_ND, gather_negatives(target_feats_ND.detach())])
            all_inputs_XD = torch.cat([input_feats_BD, gather_negatives(input_feats_BD.detach())])
            i2t_BX = model.logits(input_feats_BD, all_targets_XD, batch.temperature)
            t2i_BX = model.logits(target_feats_ND, all_inputs_XD, batch.temperature)
        out.logits = i2t_BX
        out.losses["i2t"] = batch.loss_weight * cross_entropy(i2t_BX, labels_B, batch.label_smoothing)
        out.losses["t2i"] = batch.loss_weight * cross_entropy(t2i_BX, labels_B, batch.label_smoothing)
        out.metrics["accuracy_i2t"] = accuracy(i2t_BX, labels_B)
        out.metrics["accuracy_t2i"] = accuracy(t2i_BX, labels_B)
    return out


def collate(c: Any, samples: list[dict[str, Any]]) -> TaskBatch:
    """Training: visual input, `targets` = one caption per sample (attribute role 'target').
    Evaluation: every caption of every sample in `targets`, `target_owner` [N] = its sample."""
    seg = c.single_view(samples)
    inputs = c.seq([seg])
    if c.training:
        ids, mask = c.captions(c.need(samples, "caption"))
        targets = c.seq([Segment("text", ids, mask)], role="target")
        return c.batch(samples, inputs, targets=targets)
    per_sample = c.need(samples, "captions")
    flat = [cap for caps in per_sample for cap in caps]
    owner = torch.tensor([i for i, caps in enumerate(per_sample) for _ in caps], dtype=torch.long)
    ids, mask = c.captions(flat)
    targets = c.seq([Segment("text", ids, mask)], role="target")
    return c.batch(samples, inputs, targets=targets, target_owner=owner, meta={"captions": per_sample})


def forward(model: UniPerceiver, batch: TaskBatch, target_feats_ND: Tensor | None,
            temporal_offsets: list[int] | None = None,
            gather_negatives: Callable[[Tensor], Tensor] | None = None) -> TaskOutput:
    return retrieve(model, batch, temporal_offsets, gather_negatives)


class RetrievalEvaluator(Evaluator):
    """R@1/5/10 image->text (best rank over the image's captions) and text->image."""

    @torch.no_grad()
    def process(self, indices: list[int], infos: list[dict], batch: TaskBatch) -> list[tuple[int, Any]]:
        b = len(indices)
        if batch.targets is None or batch.target_owner is None:
            raise EvalInputError(f"task {self.task.name!r}: eval batches need every caption of each input "
                                 "(targets + target_owner)")
        out = retrieve(self.model, batch)
        inp_BD = out.extras["input_feats"].float().cpu()
        txt_ND = out.extras["target_feats"].float().cpu()
        if inp_BD.shape[0] != b:
            raise EvalInputError(f"task {self.task.name!r}: {inp_BD.shape[0]} input rows for {b} samples "
                                 "(multi-view retrieval is not supported)")
        owner_N = batch.target_owner.cpu().long()
        records = []
        for i, idx in enumerate(indices):
            mine = txt_ND[owner_N == i]
            if mine.shape[0] == 0:
                sid = infos[i].get("id", idx) if i < len(infos) else idx
                raise EvalInputError(f"task {self.task.name!r}: sample {sid!r} has no captions")
            records.append((idx, {"input": inp_BD[i].clone(), "texts": mine.clone()}))
        return records

    def summarize(self, records: list[Any]) -> TaskResult:
        device = next(self.model.parameters()).device
        inputs_ID = torch.stack([r["input"] for r in records]).to(device)
        texts_TD = torch.cat([r["texts"] for r in records]).to(device)
        owner_T = torch.cat([torch.full((r["texts"].shape[0],), i, dtype=torch.long)
                             for i, r in enumerate(records)]).to(device)
        i2t, t2i = retrieval_ranks(inputs_ID, texts_TD, owner_T, self.chunk_size)
        return TaskResult(retrieval_metrics(i2t, t2i),
                          notes=[f"{inputs_ID.shape[0]} inputs, {texts_TD.shape[0]} captions"])


def chance(metric: str, candidates: int, samples: int) -> float | None:
    """R@k: k of the n samples of the set."""
    if "@" not in metric or not samples:
        return None
    digits = "".join(ch for ch in metric.split("@")[-1] if ch.isdigit())
    return 100.0 * min(int(digits), samples) / samples if digits else None


_ROWS = {"input": (VISUAL_INPUT,), "target": (VISUAL_TASK_TARGET,)}
_COMMON = dict(collate=collate, forward=forward, evaluator=RetrievalEvaluator, chance=chance, gathers_negatives=True)
SPECS = (
    TaskSpec("image_retrieval", "retrieval", "image", _ROWS, "retrieve",
             formats=("coco_karpathy", "flickr30k", "jsonl", "demo"), **_COMMON),
    TaskSpec("video_retrieval", "retrieval", "video", _ROWS, "retrieve", formats=("msvd", "jsonl", "demo"),
             **_COMMON),
)
