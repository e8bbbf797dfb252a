"""Unmixed task sampling and per-task sample streams, as pure functions of (seed, rank, step).

Every rank draws its own task every iteration (OFFICIAL.md 5), so ranks usually run different
tasks in the same step. Nothing here keeps hidden state: the task of step s on rank r and the
samples of the k-th batch of a task are recomputed from the seed, which makes resuming exact
(a restarted run replays the task draws up to its step to know where each task stream stands).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..data.rng import mix_seed



def fraction_indices(num_samples: int, fraction: float, seed: int, task_id: int) -> list[int]:
    """The training subset of `train.data_fraction` (the release's DATA_PERCENTAGE): the first
    round(fraction * N) (at least 1) of a permutation seeded by (seed, task), sorted. A pure
    function: every rank, and a resumed run, computes the same subset."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data fraction must be in (0, 1], got {fraction}")
    if fraction >= 1.0:
        return list(range(num_samples))
    keep = max(1, round(fraction * num_samples))
    g = torch.Generator().manual_seed(mix_seed(seed, 0xF4AC, task_id))
    return sorted(torch.randperm(num_samples, generator=g)[:keep].tolist())


class DatasetSubset(torch.utils.data.Dataset):
    """`dataset` restricted to `indices`; keys are (index, sample_seed) as the streams give them,
    and other attributes (num_classes, name, ...) come from the full dataset."""

    def __init__(self, dataset: torch.utils.data.Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        inner = self.indices[index]
        return self.dataset[inner if seed is None else (inner, seed)]

    def __getattr__(self, name: str):
        if name in ("dataset", "indices"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class TaskSampler:
    """Which task each rank trains on at each step.

    weighted: `random.choices(tasks, weights)` semantics, one independent draw per (rank, step)
    (the release's WeightedBatchSampler, seeded per rank);
    round_robin: tasks cycle, offset by rank (the release's 'uniformv2').
    """

    def __init__(self, weights: Sequence[float], seed: int, rank: int, strategy: str = "weighted") -> None:
        if not weights or sum(weights) <= 0:
            raise ValueError(f"task sampling weights must contain a positive value, got {list(weights)}")
        self.probs = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.cumulative = np.cumsum(self.probs)
        self.seed, self.rank, self.strategy = seed, rank, strategy
        if strategy not in ("weighted", "round_robin"):
            raise ValueError(f"unknown sampling strategy {strategy!r}")

    def task_at(self, step: int) -> int:
        if self.strategy == "round_robin":
            return (step + self.rank) % len(self.probs)
        u = np.random.default_rng(mix_seed(self.seed, 0x7A5C, self.rank, step)).random()
        return int(min(np.searchsorted(self.cumulative, u * self.cumulative[-1], side="right"), len(self.probs) - 1))

    def counts_before(self, step: int) -> list[int]:
        """How many batches of each task this rank drew before `step` (to resume the streams)."""
        counts = [0] * len(self.probs)
        for s in range(step):
            counts[self.task_at(s)] += 1
        return counts


class TaskStream:
    """The batches of one task on one rank: batch k holds `batch_size` sample keys
    (index, sample_seed). Each epoch is a fresh shared-seed permutation of the dataset, strided
    by rank (the release's TrainingSampler), so ranks see disjoint samples."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, task_id: int, rank: int, world_size: int) -> None:
        if num_samples < world_size:
            raise ValueError(f"task {task_id}: {num_samples} samples cannot be split over {world_size} ranks")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.task_id, self.rank, self.world_size = seed, task_id, rank, world_size
        self.per_rank = num_samples // world_size
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:  # a cache of a pure function, not state that matters
            g = torch.Generator().manual_seed(mix_seed(self.seed, 0xDA7A, self.task_id, epoch))
            self._perm, self._perm_epoch = torch.randperm(self.num_samples, generator=g), epoch
        return self._perm

    def batch(self, k: int) -> list[tuple[int, int]]:
        keys = []
        for i in range(self.batch_size):
            position = k * self.batch_size + i  # this rank's sample counter
            epoch, offset = divmod(position, self.per_rank)
            index = int(self._permutation(epoch)[self.rank + self.world_size * offset])
            keys.append((index, mix_seed(self.seed, 0x5EED, self.task_id, self.rank, position)))
        return keys


class StreamBatchSampler(torch.utils.data.Sampler):
    """An endless DataLoader batch sampler over a `TaskStream`, starting at batch `start`."""

    def __init__(self, stream: TaskStream, start: int = 0) -> None:
        self.stream, self.start = stream, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        k = self.start
        while True:
            yield self.stream.batch(k)
            k += 1

    def __len__(self) -> int:  # endless; DataLoader never asks when used with next()
        return 1 << 62
