"""AdamW with the release's no-decay groups, and warmup + cosine per iteration (OFFICIAL.md 6)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config.schema import OptimConfig


def _no_decay_names(model: nn.Module) -> set[str]:
    """LayerNorms, biases and 1-D parameters (gammas), embeddings, routers and temperatures."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for pname, p in module.named_parameters(recurse=False):
            full = prefix + pname
            if (
                p.ndim <= 1
                or isinstance(module, (nn.LayerNorm, nn.Embedding))
                or ".router." in f".{full}"
                or "logit_scale" in full
            ):
                names.add(full)
    return names


def build_optimizer(model: nn.Module, cfg: OptimConfig, foreach: bool | None = None) -> torch.optim.AdamW:
    no_decay = _no_decay_names(model)
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if name in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    # On CUDA, the fused kernel: one launch for every parameter's update (fp32 master weights,
    # the same AdamW math); elsewhere torch's default implementation, as before. foreach=False
    # (expert-parallel DTensor shards next to plain tensors): the per-parameter update.
    fused = bool(decay or plain) and all(p.is_cuda for p in decay + plain) and foreach is not False
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None,
                             foreach=None if fused else foreach)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear 0 -> 1 over warmup, then max(min_lr / lr, (1 + cos(pi p)) / 2)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return max(cfg.min_lr / cfg.lr, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))

