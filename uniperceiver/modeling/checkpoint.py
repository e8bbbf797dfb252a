"""The one model loader: every file a model is read from, the evaluation settings, one error format.

    model = load_model("base_moe.pt")                       # its saved config, evaluation settings
    model = load_model("step_00001000.pt", cfg.model)       # a run config's model, checked against the file
    model = load_model("base_moe.pt", adapter="adapter.pt")  # a base + a prompt-tuning adapter (modeling/adapter.py)
    load_weights(model, "init.pt")                          # into a model built elsewhere (train.init_from)

Formats (`read_weights`), told apart by their keys:
- model file: {'format', 'config': model config, 'model': state dict} (`save_pretrained`, the converter);
- training checkpoint: {'model', 'config': run config, 'optimizer', 'step', ...} (`uniperceiver.engine`);
- bare state dict (tensors only): the caller gives the model config;
- sharded directory (torch.distributed.checkpoint): read by the `read_sharded` the caller passes
  (`uniperceiver.engine.dcp.consolidate_model_state`, which lives with the code that writes it).
Keys saved from a DDP wrapper (`module.` prefix) are unwrapped. Files are read with
`weights_only=True`; the numpy globals of a training checkpoint's RNG states (and only those) are
allowed on a second try, so no arbitrary object is ever unpickled.

Evaluation settings are decided in one place, `eval_model_config` (no drop path; token-routed MoE
layers dropless, so no token is dropped at evaluation); `eval_settings` applies the same to a
model built elsewhere for the duration of a block.

Every error names the file and what was expected: `CheckpointError` ("checkpoint PATH: ...");
a missing file is a FileNotFoundError ("checkpoint PATH does not exist").
"""
from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from ..config.model import ModelConfig
from ..utils.errors import BadInput

if TYPE_CHECKING:
    from .adapter import Adapter
    from .model import UniPerceiver

__all__ = [
    "CheckpointError",
    "Weights",
    "eval_model_config",
    "eval_settings",
    "load_model",
    "load_state_dict_strict",
    "load_weights",
    "read_weights",
]

_SIZE_KEYS = ("d_model", "num_layers", "num_heads", "d_ffn")


class CheckpointError(ValueError, BadInput):
    """A checkpoint that cannot give the model asked for; the message names the file."""


@dataclass
class Weights:
    path: str
    state: dict[str, Tensor]
    model_config: dict[str, Any] | None  # the model config saved with the weights, if any
    format: Literal["model_file", "training_checkpoint", "state_dict", "sharded"]


# ----------------------------------------------------------------------------- reading
def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    from ..utils.io import load_checkpoint_file

    try:
        return load_checkpoint_file(path, map_location=map_location)
    except ValueError as first:
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip checkpoint at all: the first error says why
            raise first from None
        if not needed or not all(n.startswith("numpy.") for n in needed):
            raise first from None
        import numpy as np

        allowed = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]  # dtype classes
        for name in needed:
            module, _, attr = name.rpartition(".")
            allowed.append(getattr(importlib.import_module(module), attr))
        with torch.serialization.safe_globals(allowed):
            return load_checkpoint_file(path, map_location=map_location)


# A sharded directory's reader: path -> (full model state dict, the run config saved with it).
ShardedReader = Callable[[Path], "tuple[dict[str, Tensor], dict[str, Any]]"]


def _read_sharded(path: Path, read_sharded: ShardedReader | None) -> Weights:
    if read_sharded is None:
        raise CheckpointError(f"checkpoint {path}: a directory (a sharded checkpoint?), but this entry point "
                              "reads files only; expected a .pt file (`python -m uniperceiver.convert "
                              "--consolidate` makes one)")
    state, run_cfg = read_sharded(path)
    saved = run_cfg.get("model") if isinstance(run_cfg, dict) and isinstance(run_cfg.get("model"), dict) else None
    return Weights(str(path), state, saved, "sharded")


def read_weights(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                 read_sharded: ShardedReader | None = None) -> Weights:
    """The state dict and saved model config of any format we read (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        return _read_sharded(path, read_sharded)
    blob = _torch_load(path, map_location)
    if not isinstance(blob, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(blob).__name__}")
    saved: dict[str, Any] | None = None
    if "model" in blob and isinstance(blob["model"], dict):
        state = blob["model"]
        cfg = blob.get("config")
        fmt: Any = "model_file"
        if isinstance(cfg, dict):
            if isinstance(cfg.get("model"), dict):  # a run config: the training checkpoint's
                saved, fmt = cfg["model"], "training_checkpoint"
            else:
                saved = cfg
        if "optimizer" in blob or "step" in blob:
            fmt = "training_checkpoint"
    elif blob and all(isinstance(v, Tensor) for v in blob.values()):
        state, fmt = blob, "state_dict"
    else:
        raise CheckpointError(
            f"checkpoint {path}: neither a uniperceiver-moe model file / training checkpoint (key 'model') "
            f"nor a state dict (top-level keys: {sorted(map(str, blob))[:10]}); convert official "
            "checkpoints with `python -m uniperceiver.convert`"
        )
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return Weights(str(path), state, saved, fmt)


# ----------------------------------------------------------------------------- evaluation settings
def eval_model_config(cfg: ModelConfig) -> ModelConfig:
    """The model config for evaluation: no drop path; token-routed MoE layers dropless."""
    routing = replace(cfg.moe.routing, dropless=True)
    return replace(cfg, drop_path=0.0, moe=replace(cfg.moe, routing=routing))


@contextlib.contextmanager
def eval_settings(model: nn.Module) -> Iterator[None]:
    """Run a model built elsewhere with `eval_model_config`'s MoE setting (every token-routed layer
    dropless; drop path is off in eval mode anyway), and put its own settings back afterwards."""
    from moe import MoEConfig

    swapped = []
    for module in model.modules():
        cfg = getattr(module, "cfg", None)
        if isinstance(cfg, MoEConfig) and not cfg.dropless:
            swapped.append((module, cfg))
            module.cfg = replace(cfg, dropless=True)
    try:
        yield
    finally:
        for module, cfg in swapped:
            module.cfg = cfg


# ----------------------------------------------------------------------------- loading
def load_state_dict_strict(model: nn.Module, state: dict[str, Tensor], source: str,
                           allow_missing: Callable[[str], bool] | None = None, load=None) -> None:
    """load_state_dict that names every missing, unexpected and mis-shaped key. Keys for which
    `allow_missing(key)` is true may be absent (they keep the model's values)."""
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(state) if allow_missing is None or not allow_missing(k))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mis_shaped:
        lines = [f"{source}: state dict does not match the model"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items[:50])
                if len(items) > 50:
                    lines.append(f"    ... and {len(items) - 50} more")
        raise CheckpointError("\n".join(lines))
    if load is not None:  # e.g. expert shards take their rows (engine/parallelize.py)
        load(model, state)
    else:
        model.load_state_dict(state, strict=allow_missing is None)


def _size_hint(saved: dict[str, Any] | None, built: ModelConfig) -> str:
    if saved is None:
        return ""
    theirs = {k: saved.get(k) for k in _SIZE_KEYS} | {"moe": (saved.get("moe") or {}).get("enabled")}
    ours = {k: getattr(built, k) for k in _SIZE_KEYS} | {"moe": built.moe.enabled}
    if theirs == ours:
        return ""
    return (f"\nthe checkpoint was saved for {theirs}, but the config builds {ours}: "
            "pick the matching model config (its `_base_`) or override model.*")


def _prompt_hint(state: dict[str, Tensor], built: ModelConfig) -> str:
    from .freezing import is_prompt_only

    if not built.prompt.enabled or any(is_prompt_only(k) for k in state):
        return ""
    return ("\nthe config prompt-tunes (model.prompt.enabled) but the checkpoint has no prompts: load the base "
            "model with the run's adapter (eval.adapter=.../adapter.pt, or adapter= in the API)")


def _apply(model: nn.Module, weights: Weights, built: ModelConfig | None = None,
           allow_missing: Callable[[str], bool] | None = None, adapter: Adapter | None = None) -> None:
    try:
        if adapter is not None:
            from .adapter import apply_adapter

            apply_adapter(model, weights.state, adapter, source=f"checkpoint {weights.path}")
        else:
            load_state_dict_strict(model, weights.state, source=f"checkpoint {weights.path}",
                                   allow_missing=allow_missing)
    except CheckpointError as e:
        hint = "" if built is None else _size_hint(weights.model_config, built)
        if not hint and built is not None and adapter is None:
            hint = _prompt_hint(weights.state, built)
        raise type(e)(f"{e}{hint}") from None


def load_weights(model: nn.Module, path: str | os.PathLike, read_sharded: ShardedReader | None = None,
                 allow_missing: Callable[[str], bool] | None = None) -> None:
    """Strictly load the weights of any readable format into a model built elsewhere (keys for
    which `allow_missing(key)` is true may be absent, e.g. the prompts of a prompt-tuned model)."""
    weights = read_weights(path, read_sharded=read_sharded)
    cfg = getattr(model, "cfg", None)
    _apply(model, weights, cfg if isinstance(cfg, ModelConfig) else None, allow_missing)


def load_model(
    path: str | os.PathLike,
    model_cfg: ModelConfig | None = None,
    *,
    evaluation: bool = True,
    overrides: Sequence[str] = (),
    device: str | torch.device = "cpu",
    map_location: str | torch.device = "cpu",
    read_sharded: ShardedReader | None = None,
    adapter: str | os.PathLike | None = None,
) -> UniPerceiver:
    """A `UniPerceiver` with the weights of `path`, strictly (every mismatching key is listed).

    The model is built from `model_cfg` when given (a file saved for another size fails with both
    sizes named), else from the config saved in the file plus `overrides` (`key=value`).
    `evaluation`: `eval_model_config`'s settings and eval mode; otherwise the config as it is, in
    training mode. `adapter`: an adapter file (`modeling.adapter`) trained on this base: its prompt
    config replaces `model.prompt` and its tensors load on top of the base's; an adapter trained
    on another base is refused (`AdapterError`).
    """
    from ..config import apply_overrides, from_dict
    from .model import UniPerceiver

    weights = read_weights(path, map_location, read_sharded)
    if model_cfg is None:
        if weights.model_config is None:
            raise CheckpointError(f"checkpoint {path}: records no model config ({weights.format}); "
                                  "pass the model config (e.g. a run config's `model`)")
        data = apply_overrides(dict(weights.model_config), list(overrides))
        model_cfg = from_dict(ModelConfig, data, source=f"{path}:config")
    elif overrides:
        raise ValueError("overrides apply to the saved config; pass them in model_cfg instead")
    found = None
    if adapter is not None:
        from .adapter import read_adapter

        found = read_adapter(adapter)
        model_cfg = found.model_config(model_cfg)
    if evaluation:
        model_cfg = eval_model_config(model_cfg)
    model = UniPerceiver(model_cfg)
    _apply(model, weights, model_cfg, adapter=found)
    model = model.to(device)
    return model.eval() if evaluation else model
