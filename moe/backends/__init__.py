"""Execution backends for token dispatch: `torch` (native) and `tutel` (Tutel's kernels).

Both run the same `DispatchPlan` with the same gates, so they compute the same function:
`torch` computes only the kept slots (sorted row blocks, variable-size all-to-all); `tutel`
scatters into Tutel's padded (E, capacity, D) layout with its fast encode/decode kernels and
exchanges it with Tutel's all-to-all, computing every capacity slot.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch
from torch import Tensor

from ..dispatch import DispatchPlan
from ..experts import ExpertFn
from ..parallel import ExpertParallel


def tutel_available() -> bool:
    return importlib.util.find_spec("tutel") is not None


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' -> 'tutel' on CUDA when Tutel is importable, else 'torch'."""
    if name == "auto":
        return "tutel" if device.type == "cuda" and tutel_available() else "torch"
    if name == "tutel" and not tutel_available():
        raise ImportError(
            "MoEConfig.backend='tutel' needs Tutel (not on PyPI): install it from its source, "
            "or use backend='torch' / 'auto'"
        )
    if name not in ("torch", "tutel"):
        raise ValueError(f"unknown backend {name!r}")
    return name


def run_dispatched(
    backend: str,
    x_TI: Tensor,
    expert_ids_TK: Tensor,
    gates_TK: Tensor,
    plan: DispatchPlan,
    expert_fn: ExpertFn,
    ep: ExpertParallel,
) -> Tensor:
    """sum_k gate_k * expert_{e_k}(x_t) over every token's kept slots (zeros elsewhere)."""
    # import_module: the submodule `torch` would otherwise be shadowed by the real torch here.
    impl = importlib.import_module(f".{backend}", __name__)
    return impl.run_dispatched(x_TI, expert_ids_TK, gates_TK, plan, expert_fn, ep)
