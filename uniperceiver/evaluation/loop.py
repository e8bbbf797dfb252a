"""The evaluation loop of one task: build its eval data and evaluator (its TaskSpec's), shard the
sample indices over the ranks (contiguous, no padding), run the evaluator on this rank's batches,
gather the per-sample records in index order, and compute the metrics on rank 0, which then
shares them with every rank. The data comes from `uniperceiver.data` (`build_dataset`,
`make_collate`, `build_target_set`)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from .. import distributed as dist_utils
from ..config import ConfigError, RunConfig, TaskConfig, resolve_path
from ..data import build_dataset, build_target_set, make_collate
from ..modeling.batch import TargetSet
from ..modeling.model import UniPerceiver
from ..utils.task_registry import task_spec
from .evaluators import EvalInputError, TaskResult, evaluator_for
from .sharding import IndexedCollate, IndexedSubset, RankFailed, gather_records, shard_range
from .target_features import TargetFeatures

__all__ = ["EvalRun", "check_class_order", "eval_tasks", "evaluate_task"]


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
class EvalRun:
    """What every task of one evaluation shares."""

    cfg: RunConfig
    model: UniPerceiver
    device: torch.device
    tokenizer: Any
    features: TargetFeatures
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
            source = build_target_set(name, self.cfg.target_sets[name], self.tokenizer, self.data_root)
            self.sources[name] = (source, source.get())
        source, target_set = self.sources[name]
        return target_set, source


def evaluate_task(run: EvalRun, task: TaskConfig) -> tuple[TaskResult, int]:
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
    dataset = build_dataset(task, "eval", run.tokenizer, run.cfg.model, run.data_root, **extra)
    evaluator.check_dataset(dataset)
    notes = check_class_order(task, dataset, source, source_name)
    n = len(dataset)
    if n == 0:
        raise EvalInputError(f"task {task.name!r}: the eval dataset is empty ({task.eval_data})")
    run.say(f"{task.name}: {n} samples, {run.world} process(es), batch {task.eval_batch_size}")
    # The task's position in the config is its task id (as in training), for task-routed MoE.
    collate = make_collate(task, run.tokenizer, training=False, task_id=run.cfg.tasks.index(task))
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
