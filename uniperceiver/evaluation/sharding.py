"""Sharding an evaluation set over ranks and gathering per-sample results back in index order.

Each rank takes a contiguous, possibly uneven slice of the indices (no padding, so no sample is
counted twice, unlike a padded `DistributedSampler`), produces one record per sample index, and
`gather_records` returns every record of the whole set sorted by index on every rank. Metrics
computed from that list are therefore independent of the batch size and the number of processes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import Dataset

from .. import distributed as dist_utils

__all__ = ["IndexedCollate", "IndexedSubset", "RankFailed", "gather_records", "shard_range"]


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous slice `[rank*n//w, (rank+1)*n//w)` of `range(n)`; sizes differ by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} for world size {world_size}")
    return range(rank * n // world_size, (rank + 1) * n // world_size)


class IndexedSubset(Dataset):
    """`(index, sample)` for the given indices of `dataset` (index = position in the full set)."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        index = self.indices[i]
        return index, self.dataset[index]


# Sample fields the evaluators read directly (ground truth never has to survive the collate).
_INFO_KEYS = ("id", "label", "captions")


class IndexedCollate:
    """Wrap a sample collate: `[(index, sample)] -> (indices, infos, batch)`, where `infos` keeps
    each sample's id, label and reference captions."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[int, Any]]) -> tuple[list[int], list[dict], Any]:
        indices = [i for i, _ in items]
        samples = [s for _, s in items]
        infos = [{k: s[k] for k in _INFO_KEYS if isinstance(s, dict) and k in s} for s in samples]
        return indices, infos, self.collate(samples)


class RankFailed(RuntimeError):
    """Another rank failed; its error message is in this one."""


def gather_records(local: list[tuple[int, Any]], n: int, error: BaseException | None = None) -> list[Any]:
    """All ranks' `(index, record)` pairs -> the records of indices 0..n-1, in order, on every rank.

    A rank that failed passes its exception as `error`: every rank then raises (the failing rank
    its own exception, the others a `RankFailed` quoting it; an input error elsewhere stays an
    input error), instead of the healthy ranks waiting forever. Checks that every index arrives
    exactly once (a sharding bug must not silently skew a metric).
    """
    summary = None if error is None else (type(error).__name__, str(error), isinstance(error, (ValueError, OSError)))
    parts = dist_utils.all_gather_objects((summary, local))
    if error is not None:
        raise error
    failed = [(r, s) for r, (s, _) in enumerate(parts) if s is not None]  # type: ignore[misc]
    if failed:
        rank, (kind, message, input_error) = failed[0]
        text = f"rank {rank} failed: {kind}: {message}"
        if input_error:
            from .evaluators import EvalInputError

            raise EvalInputError(text)
        raise RankFailed(text)
    merged: dict[int, Any] = {}
    duplicates: list[int] = []
    for _, part in parts:  # type: ignore[misc]
        for index, record in part:
            if index in merged:
                duplicates.append(index)
            merged[index] = record
    missing = [i for i in range(n) if i not in merged]
    if duplicates or missing or len(merged) != n:
        raise RuntimeError(f"gathered results do not cover the {n} samples exactly once "
                           f"(duplicates {duplicates[:5]}, missing {missing[:5]})")
    return [merged[i] for i in range(n)]
