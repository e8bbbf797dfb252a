"""Classification against a target set: image/video classes and text classification with
verbalisers. The prediction is the candidate whose [SPE] feature is most similar."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..modeling.batch import TaskBatch
from ..modeling.model import UniPerceiver
from .base import TaskOutput
from .losses import accuracy, cross_entropy


def classify(
    model: UniPerceiver, batch: TaskBatch, target_feats_ND: Tensor, temporal_offsets: list[int] | None = None
) -> TaskOutput:
    enc = model.encode(batch.inputs, temporal_offsets=temporal_offsets)
    if batch.kind == "text_classification":
        if batch.spe_index is None:
            raise ValueError(f"task {batch.task}: text classification needs spe_index")
        rows = torch.arange(batch.inputs.batch_size, device=enc.hidden_BLD.device)
        # +1: the text segment starts after [SPE]
        hidden_BD = enc.hidden_BLD[rows, batch.spe_index.to(rows.device) + 1]
    else:
        hidden_BD = enc.hidden_BLD[:, 0]
    raw_BD = model.predictor.project_raw(hidden_BD)
    logits_BN = model.logits(F.normalize(raw_BD.float(), dim=-1), target_feats_ND, batch.temperature)
    if batch.kind == "classification" and model.uses_fc_prompt(batch.task):
        logits_BN = model.predictor.add_fc_prompt(logits_BN, raw_BD)
    out = TaskOutput(logits=logits_BN, decisions=enc.decisions)
    if batch.labels is not None:
        labels = batch.labels.to(logits_BN.device)
        out.losses["cls"] = batch.loss_weight * cross_entropy(logits_BN, labels, batch.label_smoothing)
        out.metrics["accuracy"] = accuracy(logits_BN, labels)
    return out
