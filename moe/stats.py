"""Routing statistics, returned on every token-routing decision (detached, never kept globally).

Shape legend: E experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RoutingStats:
    """What the router did in one forward (all detached).

    routed_E: slots assigned to each expert by the router (before capacity);
    kept_E: slots actually computed per expert; drop_rate = 1 - sum(kept) / sum(routed);
    imbalance = max(routed) / mean(routed) (1.0 is perfectly balanced).
    """

    routed_E: Tensor
    kept_E: Tensor
    capacity: int | Tensor | None  # None = dropless (a device scalar on the static path with padding)

    @property
    def num_dropped(self) -> int:
        return int((self.routed_E - self.kept_E).sum())

    @property
    def drop_rate(self) -> float:
        total = int(self.routed_E.sum())
        return 0.0 if total == 0 else self.num_dropped / total

    @property
    def imbalance(self) -> float:
        routed = self.routed_E.float()
        mean = routed.mean()
        return 0.0 if float(mean) == 0 else float(routed.max() / mean)

    def as_dict(self) -> dict[str, object]:
        return {
            "routed_per_expert": self.routed_E.tolist(),
            "kept_per_expert": self.kept_E.tolist(),
            "capacity": int(self.capacity) if isinstance(self.capacity, Tensor) else self.capacity,
            "drop_rate": self.drop_rate,
            "imbalance": self.imbalance,
        }


def stats_from_counts(routed_E: Tensor, capacity: int | Tensor | None) -> RoutingStats:
    routed_E = routed_E.detach()
    kept_E = routed_E if capacity is None else torch.clamp(routed_E, max=capacity)
    return RoutingStats(routed_E, kept_E, capacity)
