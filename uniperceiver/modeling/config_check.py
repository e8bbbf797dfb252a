"""Evaluate the model a checkpoint was trained as, not another one the YAML happens to describe.

A checkpoint that records its model config (training checkpoints, `save_pretrained` files,
converted files) is compared with the config the command built: a value that differs where the
parameter shapes cannot tell (image_size, posembed_scale, layer_norm_eps, the router's top_k, ...)
is an error naming both values, unless that key was set on the command line, which is taken as
deliberate (a warning). Differences that change shapes are left to the strict loader, whose error
lists every mismatching tensor. Settings that only training reads are not compared.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping
from typing import Any

import torch

from ..config import ConfigError, ModelConfig, from_dict, to_dict

log = logging.getLogger(__name__)

# Model keys that only training reads (or that evaluation sets itself: dropless, drop path off).
TRAINING_ONLY = ("drop_path", "moe.routing.noise", "moe.routing.noise_std", "moe.routing.jitter_eps",
                 "moe.routing.capacity_factor_train", "moe.routing.load_balance_weight",
                 "moe.routing.z_loss_weight", "moe.routing.dropless", "moe.routing.backend",
                 "moe.routing.uniform_routing", "moe.routing.batch_prioritized")


def recorded_model_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The model config a checkpoint file records (cheap: memory-mapped), or None."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 -- unreadable files are reported by the loader itself
        return None
    cfg = blob.get("config") if isinstance(blob, dict) else None
    if not isinstance(cfg, dict):
        return None
    return cfg["model"] if isinstance(cfg.get("model"), dict) else cfg


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from .model import UniPerceiver

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in UniPerceiver(cfg).state_dict().items()}


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _is_set(key: str, keys: Collection[str]) -> bool:
    """`key` or a mapping above it was given (provenance paths / override keys)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in keys for i in range(1, len(parts) + 1))


def reconcile_model_config(model_cfg: ModelConfig, recorded: Mapping[str, Any] | None, checkpoint: str,
                           set_in_files: Collection[str] = (), set_on_cli: Collection[str] = ()) -> ModelConfig:
    """The model config to evaluate `checkpoint` with: the one it `recorded`, except keys set on
    the command line (`set_on_cli`, paths like 'model.image_size': deliberate, a warning). A key a
    config file sets (`set_in_files`) to another value than the checkpoint's is an error naming
    both, unless the shapes differ too (then the strict loader lists every tensor)."""
    if recorded is None:
        return model_cfg
    try:
        saved = from_dict(ModelConfig, recorded, source=f"{checkpoint}:config")
    except ConfigError:
        return model_cfg  # recorded by another version: the strict loader is the judge
    ours, theirs = _flatten(to_dict(model_cfg)), _flatten(to_dict(saved))
    training_only = {k for k in ours if any(k == t or k.startswith(t + ".") for t in TRAINING_ONLY)}
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k) and k not in training_only)
    if not differ:
        return model_cfg
    chosen = {**theirs, **{k: ours[k] for k in training_only}}
    from_files, from_cli = [], []
    for key in differ:
        if _is_set(f"model.{key}", set_on_cli):
            from_cli.append(key)
        elif _is_set(f"model.{key}", set_in_files):
            from_files.append(key)
        else:
            log.info("model.%s: using the checkpoint's %r (the config leaves it at its default %r)",
                     key, theirs.get(key), ours.get(key))
            continue
        chosen[key] = ours.get(key)
    corrected = from_dict(ModelConfig, _unflatten(chosen), source=f"{checkpoint}:config")
    if from_files and _shapes(corrected) == _shapes(saved):
        raise ConfigError(
            "the config describes another model than the checkpoint: "
            + "; ".join(f"model.{k}={ours.get(k)!r} but {checkpoint} was trained with {theirs.get(k)!r}"
                        for k in from_files)
            + ". Remove it from the config (the checkpoint's value applies), or set it on the command line "
              "to evaluate that way deliberately")
    for key in from_cli:
        log.warning("model.%s=%r set on the command line; %s was trained with %r: evaluating as asked",
                    key, ours.get(key), checkpoint, theirs.get(key))
    return corrected
