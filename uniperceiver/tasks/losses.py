"""Task losses and accuracy (OFFICIAL.md 3.4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cross_entropy(logits_XC: Tensor, labels_X: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean CE over rows whose label is not -1. With smoothing eps this is
    (1 - eps) * NLL + eps * mean(-log p), the release's LabelSmoothingCrossEntropy."""
    return F.cross_entropy(logits_XC.float(), labels_X, ignore_index=-1, label_smoothing=label_smoothing)


def accuracy(logits_XC: Tensor, labels_X: Tensor) -> Tensor:
    """Top-1 accuracy over rows whose label is not -1 (no gradient)."""
    with torch.no_grad():
        valid = labels_X != -1
        if not bool(valid.any()):
            return logits_XC.new_zeros(())
        return (logits_XC.argmax(-1)[valid] == labels_X[valid]).float().mean()
