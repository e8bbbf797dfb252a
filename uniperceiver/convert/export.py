"""This project's model -> an official-format state dict (the inverse of `official_to_ours`).

Lets users run the official code on weights trained here (`python -m uniperceiver.convert --to
official OURS.pt OUT.pth`), and lets tests build official-format checkpoints (dense and MoE)
without the official code.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor

from ..config import to_dict
from ..modeling.model import UniPerceiver
from ..utils.io import atomic_torch_save
from .official import _PLAIN, _SPATIAL, _VISUAL_TYPE, infer_model_config

_SUB_OFFICIAL = {"qkv": "self_attn.qkv_proj", "attn_out": "self_attn.dense", "fc1": "linear1", "fc2": "linear2"}
_DENSE_MHA = {"qkv.weight": "self_attn.in_proj_weight", "qkv.bias": "self_attn.in_proj_bias",
              "attn_out.weight": "self_attn.out_proj.weight", "attn_out.bias": "self_attn.out_proj.bias"}


def to_official_state_dict(model: UniPerceiver, dense_mha_names: bool | None = None) -> dict[str, Tensor]:
    """Official key names. Dense models use nn.MultiheadAttention names (the released dense
    format) unless `dense_mha_names=False`. Sublayers that reuse a sibling's decision get a copy
    of its router, as the official model holds (unused) gates there."""
    sd = model.state_dict()
    dense_mha = (not model.cfg.moe.enabled) if dense_mha_names is None else dense_mha_names
    inverse_plain = {ours: official for official, ours in _PLAIN.items()}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in inverse_plain:
            out[inverse_plain[key]] = value
            if key.startswith("embed.norm."):
                out[inverse_plain[key].replace("token_embed", "video_embed")] = value
        elif key.startswith("predictor.logit_scale."):
            out[f"loss_prepare.logit_scale_{key.rsplit('.', 1)[1]}"] = value
        elif key == "embed.visual_type.weight":
            out[_VISUAL_TYPE] = value
        elif key.startswith("encoder.layers."):
            _, _, layer, rest = key.split(".", 3)
            prefix = f"fused_encoder.layers.{layer}."
            sub, _, leaf = rest.partition(".")
            if sub in ("gamma_1", "gamma_2", "norm1", "norm2"):
                out[prefix + rest] = value
            elif dense_mha and rest in _DENSE_MHA:
                out[prefix + _DENSE_MHA[rest]] = value
            elif leaf in ("weight", "bias"):
                out[f"{prefix}{_SUB_OFFICIAL[sub]}.{leaf}"] = value
            elif leaf in ("weight_EOI", "bias_EO"):
                name = "weight" if leaf == "weight_EOI" else "bias"
                for e in range(value.shape[0]):
                    out[f"{prefix}{_SUB_OFFICIAL[sub]}.experts.deepspeed_experts.{e}.{name}"] = value[e]
            elif leaf.startswith("router."):
                out[f"{prefix}{_SUB_OFFICIAL[sub]}.gate.{leaf[len('router.'):]}"] = value
                twin = {"qkv": "attn_out", "fc1": "fc2"}.get(sub)
                if twin and model.cfg.moe.share_decisions and twin in model.cfg.moe.sublayers:
                    out[f"{prefix}{_SUB_OFFICIAL[twin]}.gate.{leaf[len('router.'):]}"] = value.clone()
            else:
                raise KeyError(f"no official name for {key}")
        else:
            raise KeyError(f"no official name for {key}")
    out[_SPATIAL] = model.embed.spatial_pos.detach().clone()
    if _VISUAL_TYPE not in out:
        out[_VISUAL_TYPE] = torch.zeros(1, model.cfg.d_model)
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def export_official_file(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Our model file `src` -> an official checkpoint `dst` (`{"model": state dict}`, as the
    release saves). The official format holds no config, so this returns the `convert` arguments
    that give `src` back from `dst`: `--num-heads N` and a `--set key=value` for every config value
    the shapes do not tell."""
    model = UniPerceiver.from_pretrained(src)
    official = to_official_state_dict(model)
    atomic_torch_save({"model": official}, dst)
    ours, inferred = _flat(to_dict(model.cfg)), _flat(to_dict(infer_model_config(official, model.cfg.num_heads)))
    sets = [f"{key}={json.dumps(value)}" for key, value in ours.items() if inferred.get(key) != value]
    fmt = "official" if model.cfg.moe.enabled else "official-dense"
    return ["--from", fmt, os.fspath(dst), os.fspath(src), "--num-heads", str(model.cfg.num_heads),
            *(["--set", *sets] if sets else [])]
