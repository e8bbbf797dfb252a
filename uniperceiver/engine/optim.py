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
    # The fused kernel (CUDA, and CPU since torch 2.4): one pass over each parameter's memory
    # for the whole AdamW update, the same math (results differ from the per-tensor loop in
    # the last bits only). On 2 CPU cores it updates the base-width MoE's ~110M parameters in
    # ~50 ms, where torch's CPU default (the per-tensor loop) takes ~700 ms: with 8x expert
    # weights that loop alone made an MoE step ~1.5x a dense one. foreach=False (DTensor shards
    # under expert parallelism / FSDP): the per-parameter update, as the fused and foreach
    # kernels take one tensor type per call.
    params = decay + plain
    fused = bool(params) and foreach is not False and all(_fusable(p) for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None,
                             foreach=None if fused else foreach)


def clips(max_norm: float, total_norm: torch.Tensor) -> bool:
    """Whether clipping to `max_norm` changes any gradient: torch's coefficient
    clamp(max_norm / (total + 1e-6), max=1) is not exactly 1 (NaN, from a non-finite norm,
    counts as clipping). Every clipper here skips its multiply otherwise: a pass that would
    rewrite every gradient unchanged, on a CPU the untouched zero pages of the expert gradients
    (E x a dense layer's, `moe.memory`) too."""
    return not bool(torch.clamp(max_norm / (total_norm + 1e-6), max=1.0) == 1.0)


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (same norm, same scaled gradients, bit for bit), without
    the multiply when it would change nothing (`clips`)."""
    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if clips(max_norm, total):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _fusable(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") and p.is_floating_point()


def keep_implementation(optimizer: torch.optim.Optimizer, built: list[dict]) -> None:
    """`Optimizer.load_state_dict` restores each group's `fused`/`foreach`/`capturable` flags
    from the checkpoint; keep the ones this run built (a checkpoint written by another
    implementation, or on another device, resumes on this run's kernel)."""
    for group, flags in zip(optimizer.param_groups, built):
        group.update(flags)


def implementation_flags(optimizer: torch.optim.Optimizer) -> list[dict]:
    keys = ("fused", "foreach", "capturable", "differentiable")
    return [{k: g[k] for k in keys if k in g} for g in optimizer.param_groups]


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear 0 -> 1 over warmup, then max(min_lr / lr, (1 + cos(pi p)) / 2)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return max(cfg.min_lr / cfg.lr, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))

