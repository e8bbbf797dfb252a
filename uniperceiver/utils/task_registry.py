"""The task registry: one `TaskSpec` per task type holds everything that type means.

A task type (the `type:` of a task in a run config) is declared by a `TaskSpec` in a module of
`uniperceiver/tasks/` that lists it in `SPECS` (re-exported as `uniperceiver.tasks.TaskSpec`,
`task_spec`, `register`, ...). Config validation, collation, the trainer, the
evaluation runner, the data readers and the demo look the spec up here (`task_spec(type)`);
nothing else keeps a table of task types. Types that share a formulation (image and video
classification) share a `kind`, the `TaskBatch.kind` their batches carry, and with it the
collate, forward and evaluator.

Adding a task type: write `uniperceiver/tasks/<name>.py` with `SPECS = (TaskSpec(...),)` (see
`classification.py`) and a test. Code outside the package (a plugin, a test) calls
`register(spec)`, or `registered(spec)` for the duration of a `with` block.

This module imports nothing from `uniperceiver`: config, data, modeling and evaluation look specs
up here, below the task modules that import them. The modules of `uniperceiver/tasks/` are found
and imported by name on the first lookup, as plugins are.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["TaskSpec", "all_specs", "kind_spec", "register", "registered", "task_spec", "task_types"]

Role = Literal["input", "target"]


def no_chance(metric: str, candidates: int, samples: int) -> float | None:
    """No chance level defined (module-level, so a spec pickles into DataLoader workers)."""
    return None
TASKS_PACKAGE = "uniperceiver.tasks"  # where the built-in task kinds live


@dataclass(frozen=True)
class TaskSpec:
    """What one task type means, from the config to the metrics.

    `collate(c, samples)` turns reader samples into a `TaskBatch` (`c` is the task's
    `uniperceiver.data.collate.TaskCollate`, which offers the shared pieces); `forward(model,
    batch, target_feats_ND, temporal_offsets)` returns a `TaskOutput` with the weighted losses
    (`run_task` passes the features of the batch's target set, None for types without one); `evaluator` is the
    `uniperceiver.evaluation.evaluators.Evaluator` subclass that scores it; `chance(metric,
    num_candidates, num_samples)` is what guessing scores on a metric (None = not defined).
    """

    name: str  # the config's task `type`
    kind: str  # the formulation shared by types (TaskBatch.kind)
    modality: Literal["image", "video", "text"]  # of the input
    attributes: Mapping[str, tuple[tuple[int, ...], ...]]  # role -> one 8-bit attribute row per segment
    temperature: str  # default temperature (OFFICIAL.md 3.2)
    formats: tuple[str, ...]  # the data formats that can feed it
    collate: Callable[..., Any]
    forward: Callable[..., Any]
    evaluator: Any  # type[Evaluator]
    # Kinds of shared target set it is scored against; () = none (retrieval brings its own).
    target_sets: tuple[str, ...] = ()
    class_labels: bool = False  # labels [B] index the target set (checked against the data's classes)
    token_labels: bool = False  # labels are token ids (rows of a vocabulary subset after mapping)
    mixup: bool = False  # Mixup/CutMix may apply
    fc_prompt: bool = False  # the FC prompt (model.prompt.fc) may add to its logits
    # forward takes `gather_negatives=`: single-task training on several ranks adds the other
    # ranks' features as negatives without gradient (the release's FEATURE_GATHER)
    gathers_negatives: bool = False
    prompt_spe: bool = False  # read at the `<|spe|>` inside the text (spe_index), not at [SPE]
    image_pipeline: Literal["imagenet", "clip"] = "clip"  # the release's image transforms for it
    chance: Callable[[str, int, int], float | None] = no_chance

    @property
    def needs_target_set(self) -> bool:
        return bool(self.target_sets)

    def attribute_rows(self, role: Role = "input") -> tuple[tuple[int, ...], ...]:
        try:
            return self.attributes[role]
        except KeyError:
            raise KeyError(f"task type {self.name!r} has no attribute rows for role {role!r}; "
                           f"it has {sorted(self.attributes)}") from None


@dataclass
class _Registry:
    specs: dict[str, TaskSpec] = field(default_factory=dict)
    loaded: bool = False


# The table is filled once, from the modules of this package (import-time constants, like the
# tables it replaces); `register` is the one way to extend it.
_REGISTRY = _Registry()


def _load_builtins() -> None:
    if _REGISTRY.loaded:
        return
    _REGISTRY.loaded = True
    package = importlib.import_module(TASKS_PACKAGE)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{TASKS_PACKAGE}.{info.name}")
        for spec in getattr(module, "SPECS", ()):
            register(spec)


def register(spec: TaskSpec) -> TaskSpec:
    """Add a task type. Types of one kind must share its collate, forward and evaluator."""
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"register() takes a TaskSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY.specs and _REGISTRY.specs[spec.name] is not spec:
        raise ValueError(f"task type {spec.name!r} is already registered")
    for other in _REGISTRY.specs.values():
        if other.kind == spec.kind and other.name != spec.name and (
                (other.collate, other.forward, other.evaluator) != (spec.collate, spec.forward, spec.evaluator)):
            raise ValueError(f"task type {spec.name!r} has kind {spec.kind!r}, whose collate/forward/evaluator "
                             f"{other.name!r} defines differently; give it its own kind")
    _REGISTRY.specs[spec.name] = spec
    return spec


@contextlib.contextmanager
def registered(*specs: TaskSpec) -> Iterator[None]:
    """Register `specs` for the duration of the block (tests, experiments)."""
    _load_builtins()
    for spec in specs:
        register(spec)
    try:
        yield
    finally:
        for spec in specs:
            _REGISTRY.specs.pop(spec.name, None)


def task_types() -> tuple[str, ...]:
    _load_builtins()
    return tuple(sorted(_REGISTRY.specs))


def all_specs() -> tuple[TaskSpec, ...]:
    _load_builtins()
    return tuple(_REGISTRY.specs[name] for name in sorted(_REGISTRY.specs))


def task_spec(task_type: str) -> TaskSpec:
    """The spec of a task type; an unknown type names the known ones (and the closest)."""
    _load_builtins()
    try:
        return _REGISTRY.specs[task_type]
    except (KeyError, TypeError):
        known = sorted(_REGISTRY.specs)
        close = difflib.get_close_matches(str(task_type), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown task type {task_type!r}; expected one of {known}{hint}") from None


def kind_spec(kind: str) -> TaskSpec:
    """A spec of this kind (they share collate, forward and evaluator)."""
    _load_builtins()
    for spec in _REGISTRY.specs.values():
        if spec.kind == kind:
            return spec
    kinds = sorted({s.kind for s in _REGISTRY.specs.values()})
    raise ValueError(f"unknown task kind {kind!r}; expected one of {kinds}")
