"""What a resumed run may change: compare the checkpoint's recorded config with this run's.

Settings the optimizer and schedule read (lr, weight decay, betas, warmup, max_steps, ...) take
effect from the resumed step and are listed in the log; settings that fix what the weights,
the optimizer state or the sample streams mean (model shape, tasks, target sets, seed, gradient
accumulation, data fraction, the trainable set) cannot change mid-run, and resuming with them changed is refused.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError
from ..config.schema import OptimConfig
from .optim import lr_factor

# Key paths (prefixes) that cannot change mid-run, with the reason given in the error.
FROZEN: dict[str, str] = {
    "model": "the checkpoint's weights are this model",
    "tasks": "the task list fixes task ids, sampling and the sample streams",
    "target_sets": "the target sets define what the tasks are trained against",
    "seed": "the task draws and sample order are replayed from the seed",
    "train.grad_accum": "the task draws are replayed per micro-step",
    "train.data_fraction": "the training subset and its sample streams come from it",
    "train.trainable": "the optimizer state holds exactly the parameters it names",
}
# ... except these, which only evaluation or regularisation read.
CHANGEABLE: tuple[str, ...] = ("model.drop_path",)
EVAL_ONLY_TASK_KEYS = ("eval_data", "eval_batch_size", "eval_clips", "eval_crops", "beam_size",
                       "max_gen_len", "len_penalty")


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} {_short(self.old)} -> {_short(self.new)}"


def _short(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


_ABSENT = object()


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif prefix == "tasks" and isinstance(value, list) and all(isinstance(t, Mapping) and "name" in t for t in value):
        out["tasks.<order>"] = [t["name"] for t in value]
        for t in value:
            _flatten(t, f"tasks.{t['name']}", out)
    else:
        out[prefix] = list(value) if isinstance(value, tuple) else value


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Every key path whose value differs between two `to_dict(RunConfig)` dicts (tasks by name)."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(old, "", a)
    _flatten(new, "", b)
    return [Change(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(a.keys() | b.keys())
            if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def _frozen_reason(key: str) -> str | None:
    if any(key == c or key.startswith(c + ".") for c in CHANGEABLE):
        return None
    parts = key.split(".")
    if parts[0] == "tasks" and len(parts) >= 3 and parts[2] in EVAL_ONLY_TASK_KEYS:
        return None
    for prefix, reason in FROZEN.items():
        if key == prefix or key.startswith(prefix + "."):
            return reason
    return None


def split_changes(changes: list[Change]) -> tuple[list[Change], list[Change]]:
    """(changes this run applies, changes that cannot be made mid-run)."""
    frozen = [c for c in changes if _frozen_reason(c.key) is not None]
    return [c for c in changes if c not in frozen], frozen


def refuse(frozen: list[Change], checkpoint: str) -> ConfigError:
    items = "; ".join(f"{c} ({_frozen_reason(c.key)})" for c in frozen)
    return ConfigError(f"cannot resume from {checkpoint}: settings that cannot change mid-run differ from the "
                       f"checkpoint: {items}. Restore them, or start a new train.output_dir "
                       f"(train.init_from=<checkpoint> starts from its weights)")


def apply_optim_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                       cfg: OptimConfig, max_steps: int) -> None:
    """After loading the optimizer/scheduler state, make them follow `cfg` from the current
    step: base lr, weight decay of the decayed group, betas, eps, and the lr of this step under
    the (possibly new) warmup/cosine schedule. The schedule's lambda already reads `cfg`."""
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    factor = lr_factor(scheduler.last_epoch, cfg, max_steps)
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * factor
        group["betas"] = tuple(cfg.betas)
        group["eps"] = cfg.eps
        if i == 0:  # build_optimizer: group 0 decays, group 1 (norms, biases, ...) never does
            group["weight_decay"] = cfg.weight_decay
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports
