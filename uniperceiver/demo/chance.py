"""Chance levels of the demo's reported metrics."""
from __future__ import annotations

from ..config import RunConfig

__all__ = ["chance_levels"]


def chance_levels(cfg: RunConfig, report) -> dict[str, dict[str, float]]:
    """What a model that guesses would score on each reported metric (its TaskSpec's `chance`)."""
    from ..data import build_target_set
    from ..tasks import task_spec
    from ..tokenization import ClipTokenizer

    chance: dict[str, dict[str, float]] = {}
    tok = ClipTokenizer()
    for task_name, metrics in report.metrics.items():
        task = cfg.task(task_name)
        spec = task_spec(task.type)
        n = report.num_samples.get(task_name, 0)
        classes = 0
        if spec.class_labels:
            classes = len(build_target_set(task.target_set, cfg.target_sets[task.target_set], tok))
        levels = {name: spec.chance(name, classes, n) for name in metrics}
        chance[task_name] = {name: level for name, level in levels.items() if level is not None}
    return chance
