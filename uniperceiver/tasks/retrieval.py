"""Image/video-text retrieval: inputs and per-sample captions encoded by the same encoder.

Training uses in-batch negatives: label-smoothed CE over the B x B similarity in both directions
(image->text and its transpose), each weighted by the task's loss weight.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..modeling.batch import TaskBatch
from ..modeling.model import UniPerceiver
from .base import TaskOutput
from .losses import accuracy, cross_entropy


def retrieve(model: UniPerceiver, batch: TaskBatch, temporal_offsets: list[int] | None = None) -> TaskOutput:
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
        out.logits = logits_BB
        out.losses["i2t"] = batch.loss_weight * cross_entropy(logits_BB, labels_B, batch.label_smoothing)
        out.losses["t2i"] = batch.loss_weight * cross_entropy(logits_BB.t(), labels_B, batch.label_smoothing)
        out.metrics["accuracy_i2t"] = accuracy(logits_BB, labels_B)
        out.metrics["accuracy_t2i"] = accuracy(logits_BB.t(), labels_B)
    return out
