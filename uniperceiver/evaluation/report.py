"""The evaluation report: metrics per task, pinned-metric checks, the printed table and the JSON
(with the resolved config, checkpoint hash and library versions)."""
from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ConfigError, RunConfig

__all__ = ["EvalReport", "check_expected", "output_path", "versions", "write_report"]


@dataclass
class EvalReport:
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    num_samples: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)  # pinned-metric comparisons
    predictions: dict[str, list[dict]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c["ok"] for c in self.checks)

    @property
    def misses(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if not c["ok"]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "passed": self.passed,
            "checks": self.checks,
            "notes": self.notes,
            "num_samples": self.num_samples,
            "seconds": self.seconds,
            **self.meta,
        }

    def table(self) -> str:
        expected = {c["key"]: c for c in self.checks}
        rows = [("task", "metric", "value", "expected", "")]
        for task, metrics in self.metrics.items():
            for name, value in metrics.items():
                c = expected.get(f"{task}/{name}")
                exp = "" if c is None else f"{c['expected']:.2f} ± {c['tolerance']:g}"
                status = "" if c is None else ("ok" if c["ok"] else "MISS")
                rows.append((task, name, f"{value:.2f}", exp, status))
        for c in self.checks:  # pinned metrics that were never produced
            if c["actual"] is None:
                rows.append((c["task"], c["metric"], "-", f"{c['expected']:.2f} ± {c['tolerance']:g}", "MISSING"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                           enumerate(zip(row, widths))).rstrip() for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        for task, notes in self.notes.items():
            lines.extend(f"note [{task}]: {n}" for n in notes)
        return "\n".join(lines)


def check_expected(metrics: dict[str, dict[str, float]], expected: dict[str, float],
                   tolerance: float) -> list[dict[str, Any]]:
    """Compare every pinned 'task/metric' with what was measured (absolute tolerance)."""
    checks = []
    for key, value in expected.items():
        task, sep, metric = key.partition("/")
        if not sep:
            raise ConfigError(f"eval.expected key {key!r} must be 'task/metric'")
        actual = metrics.get(task, {}).get(metric)
        ok = actual is not None and abs(actual - value) <= tolerance
        checks.append({"key": key, "task": task, "metric": metric, "expected": value,
                       "actual": actual, "tolerance": tolerance, "ok": ok})
    return checks


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("uniperceiver", "pycocoevalcap", "pycocotools", "torchvision", "timm"):
        try:
            from importlib.metadata import version

            out[name] = version("uniperceiver-moe" if name == "uniperceiver" else name)
        except Exception:  # not installed as a distribution
            continue
    return out


def output_path(cfg: RunConfig) -> str:
    return cfg.eval.output_json or os.path.join(cfg.train.output_dir, "eval.json")


def write_report(report: EvalReport, path: str) -> list[str]:
    """The metrics JSON at `path`, and one `<stem>.<task>.captions.json` per caption task."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    written = []
    stem = path[:-5] if path.endswith(".json") else path
    for task, preds in report.predictions.items():
        p = f"{stem}.{task}.captions.json"
        _write_json(preds, p)
        written.append(p)
    _write_json(report.to_dict(), path)
    return [path, *written]


def _write_json(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
    os.replace(tmp, path)

