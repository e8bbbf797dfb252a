"""Zero-shot evaluation of a checkpoint on the tasks of a run config.

    report = evaluate(cfg)                       # cfg: RunConfig; what `python -m uniperceiver.eval` runs
    report.metrics["coco_caption"]["CIDEr"]

Per task: build the eval dataset and collate (uniperceiver.data), shard the sample indices over
the ranks (contiguous, no padding), run the task's evaluator on this rank's batches, gather the
per-sample records in index order, and compute the metrics from the whole list on rank 0, which
then shares them with every rank. Target sets are encoded once per run (and cached on disk with
`eval.cache_dir`). The model is built from the config's `model:` section and loads the
checkpoint strictly (`uniperceiver.modeling.checkpoint`, which also decides the evaluation
settings: MoE layers run dropless, so no token is ever dropped at evaluation).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from .. import distributed as dist_utils
from ..config import ConfigError, RunConfig, TaskConfig, resolve_path, to_dict
from ..modeling.batch import TargetSet
from ..modeling.checkpoint import eval_settings, load_model
from ..modeling.model import UniPerceiver
from ..utils.task_registry import task_spec
from .caption_metrics import SCORERS
from .evaluators import EvalInputError, TaskResult, evaluator_for
from .sharding import IndexedCollate, IndexedSubset, RankFailed, gather_records, shard_range
from .target_features import TargetFeatures, file_sha256, model_fingerprint

__all__ = ["EvalReport", "evaluate"]


# ----------------------------------------------------------------------------- report
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


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("uniperceiver", "pycocoevalcap", "pycocotools", "torchvision", "timm"):
        try:
            from importlib.metadata import version

            out[name] = version("uniperceiver-moe" if name == "uniperceiver" else name)
        except Exception:  # not installed as a distribution
            continue
    return out


# ----------------------------------------------------------------------------- the run
Builder = Callable[..., Any]


def _data_api() -> tuple[Builder, Builder, Builder]:
    try:
        from ..data import build_dataset, build_target_set, make_collate
    except ImportError as e:
        raise RuntimeError(f"uniperceiver.data does not provide the dataset builders yet ({e})") from e
    return build_dataset, make_collate, build_target_set


def _pick_device(cfg: RunConfig) -> torch.device:
    return dist_utils.local_device(dist_utils.pick_device_type(cfg.train.device))


def _target_source(cfg: RunConfig, name: str) -> str:
    ts = cfg.target_sets[name]
    if ts.kind == "vocabulary":
        return "the 49,411-entry vocabulary"
    if ts.file is not None:
        try:
            return resolve_path(ts.file, _data_root(cfg))
        except ValueError:
            return ts.file
    return f"{len(ts.names or [])} inline names"


def _data_root(cfg: RunConfig) -> str:
    return cfg.resolved_data_root()


def _norm_name(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").split())


def check_class_order(task: TaskConfig, dataset: Any, source: Any, source_name: str) -> list[str]:
    """When the dataset knows its class names (Kinetics' category_mapping.txt), compare them with
    the target set's, position by position: the same names in another order is an error (every
    prediction would be scored against the wrong class); other differences become a note."""
    data_names = getattr(dataset, "class_names", None)
    set_classes = getattr(source, "classes", None)
    if not data_names or not set_classes or len(data_names) != len(set_classes):
        return []
    synonyms = [{_norm_name(n) for n in names} for names in set_classes]
    differ = [i for i, (d, syn) in enumerate(zip(data_names, synonyms)) if _norm_name(d) not in syn]
    if not differ:
        return []
    where = getattr(dataset, "category_file", "the dataset")
    first = differ[0]
    detail = f"class {first} is {data_names[first]!r} in {where} but {set_classes[first][0]!r} in {source_name}"
    if sorted(_norm_name(d) for d in data_names) == sorted(_norm_name(c[0]) for c in set_classes):
        raise EvalInputError(f"task {task.name!r}: the class names of {source_name} are those of {where} in "
                             f"another order ({detail}); list them in label order")
    return [f"{len(differ)} class names differ from the dataset's ({detail})"]


def eval_tasks(cfg: RunConfig) -> list[TaskConfig]:
    if cfg.eval.tasks is None:
        tasks = [t for t in cfg.tasks if t.eval_data is not None]
    else:
        tasks = [cfg.task(name) for name in cfg.eval.tasks]
        missing = [t.name for t in tasks if t.eval_data is None]
        if missing:
            raise ConfigError(f"eval.tasks names {missing}, which have no eval_data")
    if not tasks:
        raise ConfigError("nothing to evaluate: no task has eval_data")
    return tasks


@dataclass
class _Run:
    """What every task of one evaluation shares."""

    cfg: RunConfig
    model: UniPerceiver
    device: torch.device
    tokenizer: Any
    features: TargetFeatures
    build_dataset: Builder
    make_collate: Builder
    build_target_set: Builder
    data_root: str
    rank: int
    world: int
    progress: bool
    verbose: bool
    scorers: tuple[str, ...]
    spice: bool | None
    sources: dict[str, Any] = field(default_factory=dict)  # target-set name -> its source (built once)

    def say(self, text: str) -> None:
        if self.rank == 0 and self.verbose:
            print(f"[eval] {text}", file=sys.stderr, flush=True)

    def target_set(self, name: str) -> tuple[TargetSet, Any]:
        if name not in self.sources:
            source = self.build_target_set(name, self.cfg.target_sets[name], self.tokenizer, self.data_root)
            self.sources[name] = (source, source.get())
        source, target_set = self.sources[name]
        return target_set, source


def _evaluate_task(run: _Run, task: TaskConfig) -> tuple[TaskResult, int]:
    """One task on this rank's shard; the result (computed on rank 0) and the number of samples."""
    target_set, source, source_name, extra = None, None, "", {}
    if task.target_set is not None:
        target_set, source = run.target_set(task.target_set)
        source_name = getattr(source, "source", "") or _target_source(run.cfg, task.target_set)
        if task_spec(task.type).class_labels:
            extra["num_classes"] = len(target_set)  # the data layer checks its labels against it
    evaluator = evaluator_for(
        task, model=run.model, target_set=target_set, target_source=source_name, features=run.features,
        chunk_size=run.cfg.eval.target_chunk_size, tokenizer=run.tokenizer, scorers=run.scorers, spice=run.spice)
    dataset = run.build_dataset(task, "eval", run.tokenizer, run.cfg.model, run.data_root, **extra)
    evaluator.check_dataset(dataset)
    notes = check_class_order(task, dataset, source, source_name)
    n = len(dataset)
    if n == 0:
        raise EvalInputError(f"task {task.name!r}: the eval dataset is empty ({task.eval_data})")
    run.say(f"{task.name}: {n} samples, {run.world} process(es), batch {task.eval_batch_size}")
    # The task's position in the config is its task id (as in training), for task-routed MoE.
    collate = run.make_collate(task, run.tokenizer, training=False, task_id=run.cfg.tasks.index(task))
    loader = DataLoader(
        IndexedSubset(dataset, shard_range(n, run.rank, run.world)),
        batch_size=task.eval_batch_size, shuffle=False, num_workers=run.cfg.train.num_workers,
        collate_fn=IndexedCollate(collate), pin_memory=run.device.type == "cuda",
    )
    local: list[tuple[int, Any]] = []
    error: BaseException | None = None
    try:
        if target_set is not None:
            run.features.get(target_set)  # encoded before the loop, so the two progress bars do not mix
        from tqdm import tqdm

        with torch.no_grad():
            for indices, infos, batch in tqdm(loader, desc=f"eval {task.name}", disable=not run.progress,
                                              leave=False, dynamic_ncols=True):
                local.extend(evaluator.process(indices, infos, batch.to(run.device)))
    except Exception as e:  # every rank must still reach the gather, or the others wait forever
        error = e
    records = gather_records(local, n, error)
    result: TaskResult | None = None
    failure: BaseException | None = None
    if run.rank == 0:  # caption metrics run Java once, on rank 0; everyone gets its result
        try:
            result = evaluator.summarize(records)
        except Exception as e:
            failure = e
    shared = dist_utils.all_gather_objects(
        (result, None if failure is None else f"{type(failure).__name__}: {failure}"))[0]
    if failure is not None:
        raise failure
    result, message = shared  # type: ignore[misc]
    if message is not None:
        raise RankFailed(f"rank 0 failed computing the metrics of {task.name!r}: {message}")
    assert result is not None
    result.notes = notes + list(result.notes)
    return result, n


def evaluate(
    cfg: RunConfig,
    *,
    model: UniPerceiver | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    build_dataset: Builder | None = None,
    make_collate: Builder | None = None,
    build_target_set: Builder | None = None,
    tokenizer: Any = None,
    caption_scorers: tuple[str, ...] = SCORERS,
    spice: bool | None = None,
    verbose: bool = False,
) -> EvalReport:
    """Evaluate `cfg.eval.checkpoint` (or `model`) on the config's eval tasks.

    The builders default to `uniperceiver.data` (`build_dataset(task, 'eval', tokenizer,
    model_cfg, data_root, num_classes=...)`, `make_collate(task, tokenizer, training=False,
    task_id=...)`, `build_target_set(name, cfg, tokenizer, data_root)` -> a source with `.get()`
    -> TargetSet); tests pass their own. `progress`: bars on rank 0 (default: when stderr is a
    terminal). `caption_scorers` / `spice` choose the caption metrics (all; SPICE when its jars are
    installed). `verbose` prints a line per task to stderr (rank 0). Runs on every rank of an
    initialised process group; an error on any rank is raised on every rank.
    """
    from ..tokenization import ClipTokenizer

    rank, world = dist_utils.rank(), dist_utils.world_size()
    if progress is None:  # bars on a terminal; none in log files (SLURM, CI)
        progress = sys.stderr.isatty()
    device = torch.device(device) if device is not None else _pick_device(cfg)
    tasks = eval_tasks(cfg)
    checkpoint = cfg.eval.checkpoint if model is None else None  # a given model is hashed instead
    if model is None:
        if not checkpoint:
            raise ConfigError("no checkpoint to evaluate: set eval.checkpoint=PATH (in the config or "
                              "as a command-line override)")
        from ..engine.dcp import consolidate_model_state  # a sharded run's distributed checkpoint

        model = load_model(checkpoint, cfg.model, device=device, read_sharded=consolidate_model_state)
    else:
        model = model.to(device).eval()
    if build_dataset is None or make_collate is None or build_target_set is None:
        default_ds, default_collate, default_set = _data_api()
        build_dataset = build_dataset or default_ds
        make_collate = make_collate or default_collate
        build_target_set = build_target_set or default_set

    memo: dict[str, str] = {}

    def checkpoint_sha256() -> str:
        if "sha" not in memo:
            memo["sha"] = file_sha256(checkpoint)
        return memo["sha"]

    def model_key() -> str:  # only computed when a disk cache needs it
        if "model" not in memo:
            memo["model"] = model_fingerprint(model, checkpoint_sha256() if checkpoint else None)
        return memo["model"]

    features = TargetFeatures(model, chunk_size=cfg.eval.target_chunk_size, cache_dir=cfg.eval.cache_dir,
                              model_key=model_key, progress=progress and rank == 0)
    if cfg.eval.caption_metrics is not None and caption_scorers is SCORERS:
        caption_scorers = tuple(cfg.eval.caption_metrics)
    spice = cfg.eval.spice if spice is None else spice
    run = _Run(cfg, model, device, tokenizer or ClipTokenizer(), features, build_dataset, make_collate,
               build_target_set, _data_root(cfg), rank, world, progress and rank == 0, verbose,
               tuple(caption_scorers), spice)
    report = EvalReport()
    for task in tasks:
        start = time.perf_counter()
        with eval_settings(model):
            result, n = _evaluate_task(run, task)
        report.metrics[task.name] = result.metrics
        if result.notes:
            report.notes[task.name] = result.notes
        if result.predictions is not None:
            report.predictions[task.name] = result.predictions
        report.num_samples[task.name] = n
        report.seconds[task.name] = round(time.perf_counter() - start, 3)
        run.say(f"{task.name}: done in {report.seconds[task.name]:.1f} s")

    report.checks = check_expected(report.metrics, cfg.eval.expected, cfg.eval.tolerance)
    report.meta = {
        "checkpoint": {"path": None if checkpoint is None else os.path.abspath(checkpoint),
                       "sha256": checkpoint_sha256() if checkpoint and rank == 0 else None},
        "config": to_dict(cfg),
        "world_size": world,
        "device": str(device),
        "target_sets": {"encoded": features.encoded, "loaded_from_cache": features.loaded},
        "versions": _versions(),
        "command": " ".join(sys.argv),
    }
    return report


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

