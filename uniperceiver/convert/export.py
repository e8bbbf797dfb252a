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
from .official import _DEEP_PROMPT, _PLAIN, _PROMPT_PLAIN, _SPATIAL, _VISUAL_TYPE, infer_model_config

_SUB_OFFICIAL = {"qkv": "self_attn.qkv_proj", "attn_out": "self_attn.dense", "fc1": "linear1", "fc2": "linear2"}
_INVERSE_PLAIN = {ours: official for official, ours in _PLAIN.items()}
_INVERSE_PROMPT = {ours: official for official, ours in _PROMPT_PLAIN.items()}
_INVERSE_DEEP_PROMPT = {ours: official for official, ours in _DEEP_PROMPT.items()}
_DENSE_MHA = {"qkv.weight": "self_attn.in_proj_weight", "qkv.bias": "self_attn.in_proj_bias",
              "attn_out.weight": "self_attn.out_proj.weight", "attn_out.bias": "self_attn.out_proj.bias"}


def official_names(key: str, model: UniPerceiver, dense_mha: bool | None = None) -> list[str]:
    """Every official state-dict name of our state-dict entry `key`, the official model's first
    name (the one its `named_parameters()` reports) first. Expert tensors [E, ...] are one per
    expert in the official model: their names are listed in expert order."""
    cfg = model.cfg
    dense_mha = (not cfg.moe.enabled) if dense_mha is None else dense_mha
    if key in _INVERSE_PLAIN:
        name = _INVERSE_PLAIN[key]
        # The release registers its shared embedding LayerNorm under both tokenizers.
        return [name, name.replace("token_embed", "video_embed")] if key.startswith("embed.norm.") else [name]
    if key in _INVERSE_PROMPT:
        name = _INVERSE_PROMPT[key]
        # ...and s_token_bias on the model and on the token embedding.
        return [name, "token_embed.s_token_bias"] if name == "s_token_bias" else [name]
    if key.startswith("predictor.logit_scale."):
        return [f"loss_prepare.logit_scale_{key.rsplit('.', 1)[1]}"]
    if key == "embed.visual_type.weight":
        return [_VISUAL_TYPE]
    if key.startswith("encoder.layers."):
        _, _, layer, rest = key.split(".", 3)
        prefix = f"fused_encoder.layers.{layer}."
        sub, _, leaf = rest.partition(".")
        if sub in ("gamma_1", "gamma_2", "norm1", "norm2"):
            return [prefix + rest]
        if rest in _INVERSE_DEEP_PROMPT:
            return [prefix + _INVERSE_DEEP_PROMPT[rest]]
        if dense_mha and rest in _DENSE_MHA:
            return [prefix + _DENSE_MHA[rest]]
        if leaf in ("weight", "bias"):
            return [f"{prefix}{_SUB_OFFICIAL[sub]}.{leaf}"]
        if leaf in ("weight_EOI", "bias_EO"):
            name = "weight" if leaf == "weight_EOI" else "bias"
            return [f"{prefix}{_SUB_OFFICIAL[sub]}.experts.deepspeed_experts.{e}.{name}"
                    for e in range(cfg.moe.routing.num_experts)]
        if leaf.startswith("router."):
            names = [f"{prefix}{_SUB_OFFICIAL[sub]}.gate.{leaf[len('router.'):]}"]
            twin = {"qkv": "attn_out", "fc1": "fc2"}.get(sub)
            if twin and cfg.moe.share_decisions and twin in cfg.moe.sublayers:
                names.append(f"{prefix}{_SUB_OFFICIAL[twin]}.gate.{leaf[len('router.'):]}")
            return names
    raise KeyError(f"no official name for {key}")


def to_official_state_dict(model: UniPerceiver, dense_mha_names: bool | None = None) -> dict[str, Tensor]:
    """Official key names. Dense models use nn.MultiheadAttention names (the released dense
    format) unless `dense_mha_names=False`. Sublayers that reuse a sibling's decision get a copy
    of its router, as the official model holds (unused) gates there."""
    sd = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        names = official_names(key, model, dense_mha_names)
        if key.endswith(("weight_EOI", "bias_EO")):
            out.update({name: value[e] for e, name in enumerate(names)})
        elif ".router." in key:
            out[names[0]] = value
            out.update({name: value.clone() for name in names[1:]})  # the unused twin gate
        else:
            out.update({name: value for name in names})
    if "similarity_weight" in out:
        out["similarity_weight"] = out["similarity_weight"].reshape(())
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
