"""Official collated batches (OFFICIAL.md 4.1) -> this project's `TaskBatch`es.

Used by `tools.check_official` to feed the model the exact batches the official collator built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import yaml

from ..modeling.batch import Segment, Sequence, TargetSet, TaskBatch
from ..utils.task_registry import task_spec

@dataclass
class OfficialTaskSettings:
    """Per-task settings read from the official config (TASKS[i])."""

    name: str
    temperature: str | None = None
    loss_weight: float = 1.0
    label_smoothing: float = 0.0
    beam_size: int = 2
    max_len: int = 21
    len_penalty: float = 0.0


def parse_official_tasks(config_yaml: str | None) -> dict[str, OfficialTaskSettings]:
    """Task settings (temperature name, loss weight, smoothing, decoding) from an official YAML."""
    if not config_yaml:
        return {}
    cfg = yaml.safe_load(config_yaml) or {}
    settings = {}
    for task in cfg.get("TASKS", []) or []:
        name = task.get("NAME")
        model = task.get("MODEL", {}) or {}
        losses = task.get("LOSSES", {}) or {}
        decode = task.get("DECODE_STRATEGY", {}) or {}
        temp = model.get("TEMP_NAME")
        smoothing = float(losses.get("LABELSMOOTHING", 0.0)) if any(
            "LabelSmoothing" in n for n in losses.get("NAMES", [])) else 0.0
        settings[name] = OfficialTaskSettings(
            name=name,
            temperature=temp[len("logit_scale_"):] if temp else None,
            loss_weight=float(losses.get("LOSS_WEIGHT", 1.0)),
            label_smoothing=smoothing,
            beam_size=int(decode.get("BEAM_SIZE", 2)),
            max_len=int(model.get("EVAL_MAX_SEQ_LEN", 21)),
            len_penalty=float(model.get("LEN_PENALTY", decode.get("LEN_PENALTY", 0.0))),
        )
    return settings


def _segment(sample: dict[str, Any]) -> Segment:
    data = sample["data"]
    modality = sample["modality"]
    if modality == "text":
        mask = sample.get("invalid_mask")
        mask = None if mask is None else mask.bool()
        info = sample.get("sample_info") or []
        info0 = info[0] if isinstance(info, list) and info else info if isinstance(info, dict) else {}
        positions = None
        if isinstance(info0, dict) and info0.get("text_spe_cat"):
            half = data.shape[1] // 2
            positions = torch.arange(half).repeat(2)  # [0..T-1, 0..T-1]
        return Segment("text", data.long(), mask, positions)
    if modality == "video" and data.dim() == 5:
        return Segment("video", data.float())
    return Segment(modality, data.float())


def _attributes(samples: list[dict[str, Any]]) -> torch.Tensor | None:
    for s in samples:
        if s.get("moe_embedding") is not None:
            return s["moe_embedding"].float()
    return None


def shared_target_sets(batch: dict[str, Any]) -> dict[str, TargetSet]:
    sets = {}
    for name, entries in (batch.get("shared_target_sets") or {}).items():
        entry = entries[0]
        mask = entry.get("invalid_mask")
        sets[name] = TargetSet(
            name=name,
            ids_NL=entry["data"].long(),
            padding_mask_NL=None if mask is None else mask.bool(),
            attributes_SA=_attributes([entry]),
        )
    return sets


def translate_batch(batch: dict[str, Any], settings: OfficialTaskSettings | None, training: bool) -> TaskBatch:
    """One official batch -> a `TaskBatch` (caption eval batches hold the visual prefix only)."""
    info = batch["task_info"]
    task_type = info["task_type"]
    try:
        spec = task_spec(task_type)
    except ValueError as e:
        raise ValueError(f"task {info.get('task_name')}: unsupported official task type ({e})") from None
    kind = spec.kind
    settings = settings or OfficialTaskSettings(name=info["task_name"])
    inputs = batch["input_sample_list"]
    attributes = _attributes(inputs)
    segments = [_segment(s) for s in inputs]
    caption_train = kind == "caption" and len(segments) == 2
    decode_rows = None
    if kind == "caption" and not caption_train:
        decode_rows = None if attributes is None else attributes[1:]
        attributes = None if attributes is None else attributes[:1]
    seq = Sequence(segments, attributes_SA=attributes, caption_queries=caption_train)
    labels = batch["target_idx_list"][0].long() if batch.get("target_idx_list") else None
    targets = None
    owner = None
    if batch.get("target_sample_list"):
        t = batch["target_sample_list"][0]
        targets = Sequence([_segment(t)], attributes_SA=_attributes([t]))
        if not training:
            # sample_alone: each input brings all of its captions, ids (img_id, [img_id] * n)
            owner_ids = []
            for idx, s in enumerate(inputs[0]["sample_info"]):
                sid = s.get("id") if isinstance(s, dict) else None
                n = len(sid[1]) if isinstance(sid, (tuple, list)) and len(sid) == 2 else 1
                owner_ids += [idx] * n
            owner = torch.tensor(owner_ids)
    target_set = batch["target_set_list"][0] if batch.get("target_set_list") else None
    if kind == "caption" and target_set is None:
        # caption evaluation names no set; it decodes over the vocabulary it was given
        names = list(batch.get("shared_target_sets") or {})
        target_set = "Vocab_Word" if "Vocab_Word" in names else (names[0] if names else None)
    spe_index = None
    if spec.prompt_spe:
        spe_index = torch.tensor([s["spe_index"] for s in inputs[0]["sample_info"]])
    return TaskBatch(
        task=info["task_name"],
        kind=kind,
        temperature=settings.temperature or spec.temperature,
        inputs=seq,
        labels=labels,
        targets=targets,
        target_owner=owner,
        target_set=target_set,
        spe_index=spe_index,
        loss_weight=settings.loss_weight,
        label_smoothing=settings.label_smoothing,
        decode_attributes_SA=decode_rows,
    )
