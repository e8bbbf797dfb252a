"""Convert official checkpoints into models or model files."""
from __future__ import annotations

import os
from typing import Sequence

import torch

from ..config import ModelConfig, apply_overrides, from_dict, to_dict
from ..modeling.model import CHECKPOINT_FORMAT, UniPerceiver
from ..utils.io import atomic_torch_save, load_checkpoint_file
from .official import (
    ConversionReport,
    SourceFormat,
    deepspeed_to_official,
    infer_model_config,
    official_to_ours,
    unwrap_checkpoint,
)


def convert_state_dict(
    sd: dict[str, torch.Tensor],
    fmt: SourceFormat,
    *,
    num_heads: int | None = None,
    overrides: Sequence[str] = (),
    fold_visual_type: bool | None = None,
) -> tuple[UniPerceiver, ConversionReport]:
    """A `UniPerceiver` holding the weights of an official state dict (already unwrapped)."""
    report = ConversionReport()
    if fmt == "deepspeed":
        sd = deepspeed_to_official(sd, report)
    if fold_visual_type is None:
        # The released DeepSpeed MoE model added the visual type embedding; the official
        # PyTorch code never does (OFFICIAL.md 7.4).
        fold_visual_type = fmt == "deepspeed"
    inferred = infer_model_config(sd, num_heads)
    cfg_dict = apply_overrides(to_dict(inferred), list(overrides))
    cfg = from_dict(ModelConfig, cfg_dict, source="converter overrides")
    if fmt == "official-dense" and cfg.moe.enabled:
        raise ValueError("--from official-dense, but the state dict holds MoE experts: use --from official")
    with torch.device("meta"):
        expected = UniPerceiver(cfg).state_dict()
    state, report = official_to_ours(sd, cfg, expected, fold_visual_type=fold_visual_type, report=report)
    model = UniPerceiver(cfg)
    model.load_state_dict(state, strict=True)
    return model, report


def convert_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    fmt: SourceFormat,
    **kwargs,
) -> ConversionReport:
    blob = load_checkpoint_file(src, weights_only=False if fmt == "deepspeed" else True)
    sd = unwrap_checkpoint(blob, fmt, str(src))
    model, report = convert_state_dict(sd, fmt, **kwargs)
    atomic_torch_save(
        {"format": CHECKPOINT_FORMAT, "config": to_dict(model.cfg), "model": model.state_dict(),
         "converted_from": {"path": str(src), "format": fmt}},
        dst,
    )
    return report
