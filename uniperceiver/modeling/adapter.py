"""Adapter files: what a prompt-tuned (or partly frozen) run trained, without the base model.

    save_adapter(model, "adapter.pt")                                  # after prompt tuning
    model = UniPerceiver.from_pretrained("base.pt", adapter="adapter.pt")   # or api.load_model,
                                                                       # eval.adapter=..., the one loader

An adapter holds the trainable tensors plus every tensor the base model lacks (the prompts), the
prompt config that builds them, and the SHA-256 of the base model's other tensors. Loading one
(`modeling.checkpoint.load_model(..., adapter=...)`, which every entry point goes through) refuses
a base whose fingerprint differs: the trained prompts only mean something on the frozen weights
they were trained with.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..config.model import ModelConfig, PromptConfig
from .checkpoint import CheckpointError
from .freezing import is_prompt_only

__all__ = ["ADAPTER_FORMAT", "Adapter", "AdapterError", "apply_adapter", "base_fingerprint", "read_adapter",
           "save_adapter", "write_adapter"]

ADAPTER_FORMAT = "uniperceiver-moe/adapter-v1"


class AdapterError(CheckpointError):
    """An adapter file is malformed or does not belong to the base model it is loaded onto."""


@dataclass
class Adapter:
    path: str
    prompt: PromptConfig
    base_sha256: str
    tensors: dict[str, Tensor]

    def model_config(self, base: ModelConfig) -> ModelConfig:
        """The base model config with the adapter's prompt switches. The tasks its FC prompt
        applies to are the adapter's, unless `base` names some (`model.prompt.fc_prompt_tasks` of
        an evaluation config whose task names differ from the training run's)."""
        prompt = self.prompt
        if base.prompt.fc_prompt_tasks and prompt.fc:
            prompt = replace(prompt, fc_prompt_tasks=list(base.prompt.fc_prompt_tasks))
        return replace(base, prompt=prompt)


def base_fingerprint(state: Mapping[str, Tensor], exclude: Iterable[str] = ()) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of `state` minus `exclude`, in name order."""
    skip = set(exclude)
    h = hashlib.sha256()
    for key in sorted(k for k in state if k not in skip):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def adapter_tensor_names(model: nn.Module) -> list[str]:
    """State-dict keys an adapter of `model` carries: every name of a trainable tensor (a shared
    tensor under all its names) and the prompt tensors."""
    trainable = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return [k for k in model.state_dict() if k in trainable or is_prompt_only(k)]


def save_adapter(model: nn.Module, path: str | os.PathLike, state: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
    """Write the adapter of `model` atomically; returns what was written (without the tensors).
    `state`: the model's full state dict when the caller already gathered it (expert shards)."""
    state = model.state_dict() if state is None else state
    names = adapter_tensor_names(model)
    if not names:
        raise AdapterError("the model has no trainable or prompt tensors: nothing to save in an adapter")
    return write_adapter(path, model.cfg.prompt, base_fingerprint(state, names), {k: state[k] for k in names})


def write_adapter(path: str | os.PathLike, prompt: PromptConfig, base_sha256: str,
                  tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """Write an adapter atomically from its parts (a sharded run fingerprints its base once, at
    the start, and gathers only the adapter's tensors at each save)."""
    from ..config import to_dict
    from ..utils.io import atomic_torch_save

    blob = {
        "format": ADAPTER_FORMAT,
        "prompt": to_dict(prompt),
        "base_sha256": base_sha256,
        "tensors": {k: t.detach().cpu().clone() for k, t in tensors.items()},
    }
    atomic_torch_save(blob, path)
    return {k: v for k, v in blob.items() if k != "tensors"} | {
        "num_tensors": len(tensors), "numel": sum(t.numel() for t in tensors.values())}


def read_adapter(path: str | os.PathLike) -> Adapter:
    from ..config import ConfigError, from_dict
    from ..utils.io import load_checkpoint_file

    if not os.path.isfile(path):
        raise AdapterError(f"adapter {path}: no such file (expected an adapter written by save_adapter, "
                           "e.g. a prompt-tuning run's <output_dir>/adapter.pt)")
    try:
        blob = load_checkpoint_file(path, map_location="cpu")
    except ValueError as exc:
        raise AdapterError(f"adapter {path}: not an adapter file ({exc})") from None
    if not isinstance(blob, dict) or blob.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"adapter {path}: not an adapter file (expected format {ADAPTER_FORMAT!r}; "
                           "write one with uniperceiver.modeling.adapter.save_adapter)")
    for key in ("prompt", "base_sha256", "tensors"):
        if key not in blob:
            raise AdapterError(f"adapter {path}: lacks {key!r}")
    try:
        prompt = from_dict(PromptConfig, blob["prompt"], source=f"{path}:prompt")
    except ConfigError as exc:
        raise AdapterError(f"adapter {path}: {exc}") from None
    return Adapter(str(path), prompt, blob["base_sha256"], dict(blob["tensors"]))


def apply_adapter(model: nn.Module, base_state: Mapping[str, Tensor], adapter: Adapter, source: str) -> None:
    """Load base weights + adapter tensors into `model` (built with `adapter.model_config`),
    refusing a base whose fingerprint is not the one the adapter was trained on."""
    from .checkpoint import load_state_dict_strict

    found = base_fingerprint(base_state, adapter.tensors)
    if found != adapter.base_sha256:
        raise AdapterError(
            f"{source}: adapter {adapter.path} was trained on another base model (base fingerprint "
            f"{adapter.base_sha256[:16]}..., this base {found[:16]}...)"
        )
    load_state_dict_strict(model, {**base_state, **adapter.tensors}, source=f"{source} + adapter {adapter.path}")
