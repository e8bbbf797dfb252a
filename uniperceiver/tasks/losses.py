"""Task losses and accuracy (OFFICIAL.md 3.4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cross_entropy(logits_XC: Tensor, labels_X: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean CE over rows whose label is not -1. With smoothing eps this is
    (1 - eps) * NLL + eps * mean(-log p), the release's LabelSmoothingCrossEntropy.

    Float labels [X, C] are soft targets (Mixup/CutMix, the release's SoftTargetCrossEntropy):
    mean over rows of sum(-target * log p); their smoothing is already folded in, so
    `label_smoothing` is not applied again.
    """
    if labels_X.is_floating_point():
        if labels_X.shape != logits_XC.shape:
            raise ValueError(f"soft targets {tuple(labels_X.shape)} do not match logits {tuple(logits_XC.shape)}")
        return torch.sum(-labels_X.float() * F.log_softmax(logits_XC.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits_XC.float(), labels_X, ignore_index=-1, label_smoothing=label_smoothing)


def accuracy(logits_XC: Tensor, labels_X: Tensor) -> Tensor:
    """Top-1 accuracy over rows whose label is not -1 (no gradient); soft targets count their
    largest class as the label."""
    with torch.no_grad():
        if labels_X.is_floating_point():
            labels_X = labels_X.argmax(-1)
        valid = labels_X != -1
        if not bool(valid.any()):
            return logits_XC.new_zeros(())
        return (logits_XC.argmax(-1)[valid] == labels_X[valid]).float().mean()
