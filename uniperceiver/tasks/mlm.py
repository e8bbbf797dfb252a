"""Masked language modelling: the outputs at masked positions classified over the vocabulary."""
from __future__ import annotations

from torch import Tensor

from ..modeling.batch import TaskBatch
from ..modeling.model import UniPerceiver
from .base import TaskOutput
from .losses import accuracy, cross_entropy


def masked_lm(model: UniPerceiver, batch: TaskBatch, vocab_feats_VD: Tensor) -> TaskOutput:
    if batch.labels is None:
        raise ValueError(f"task {batch.task}: MLM needs labels [B, L] (-1 where not masked)")
    enc = model.encode(batch.inputs)
    labels_BL = batch.labels.to(enc.hidden_BLD.device)
    masked_BL = labels_BL != -1
    # Text tokens follow [SPE]; row-major order over (sample, position), as the release.
    hidden_XD = enc.hidden_BLD[:, 1 : 1 + labels_BL.shape[1]][masked_BL]
    logits_XV = model.logits(model.features(hidden_XD), vocab_feats_VD, batch.temperature)
    targets_X = labels_BL[masked_BL]
    out = TaskOutput(logits=logits_XV, decisions=enc.decisions)
    out.losses["mlm"] = batch.loss_weight * cross_entropy(logits_XV, targets_X, batch.label_smoothing)
    out.metrics["accuracy"] = accuracy(logits_XV, targets_X)
    return out
