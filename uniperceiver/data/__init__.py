"""Task data: readers of the original layouts, transforms, collation into `TaskBatch`es and the
shared target sets.

Sample convention (every reader returns a dict):
- `image`: float [3, S, S], normalised with the ImageNet mean/std;
- `video`: float [T, 3, S, S], normalised with mean = std = 0.5; multi-view evaluation
  [V, T, 3, S, S] (V = eval_crops x eval_clips, crop-major);
- `label`: int (classification, GLUE);
- `caption`: str, one training caption; `captions`: list[str], every ground truth (evaluation);
- `ids` (list[int]) + `mlm_labels` (list[int], -1 where not masked): MLM;
- `ids` + `spe_index` (int) + `label`: GLUE-style text classification;
- `id`: the sample id used in evaluation outputs;
- `skipped` (only when > 0): unreadable samples passed over to reach this one (`on_error: skip`).

Randomness: in training index a dataset with `(index, seed)`; every random choice of the sample
depends only on that seed (`uniperceiver.data.rng`). A plain int index (evaluation) uses a seed
derived from the index, so evaluation is deterministic.

Entry points: `build_dataset` (the reader of each format: `readers.READERS`), `check_reader_options`,
`make_collate`, `build_target_set`, `build_mixup`.
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Literal

from torch.utils.data import Dataset

from ..config.model import ModelConfig
from ..config.loader import ConfigError
from ..config.schema import RunConfig, TaskConfig, resolve_path
from ..tokenization import ClipTokenizer
from ..utils.task_registry import task_spec
from .collate import TaskCollate, make_collate, pad_ids
from .errors import DataError, MediaError
from .rng import mix_seed, sample_rng, split_index
from .target_sets import TargetSetSource, build_target_set, read_class_names
from .transforms import BatchMixup, build_image_transform, build_mixup, build_video_transform

__all__ = [
    "BatchMixup",
    "DataError",
    "MediaError",
    "TargetSetSource",
    "TaskCollate",
    "build_dataset",
    "check_reader_options",
    "build_image_transform",
    "build_mixup",
    "build_target_set",
    "build_video_transform",
    "make_collate",
    "mix_seed",
    "pad_ids",
    "read_class_names",
    "sample_rng",
    "split_index",
]

def check_reader_options(cfg: RunConfig, split: Literal["train", "eval"]) -> None:
    """Validate the `options` of every `split` data source against its reader's typed options
    before any work: a ConfigError names the key and suggests the closest valid one, or names the
    unset variable (e.g. $DATA_PATH) a path option uses."""
    from .datasets.base import read_options
    from .readers import READERS

    side = "train_data" if split == "train" else "eval_data"
    for i, task in enumerate(cfg.tasks):
        source = getattr(task, side)
        if source is None or source.format not in READERS:
            continue
        key = f"tasks[{i}].{side}.options"
        options = read_options(READERS[source.format].options, source, key, f"task {task.name!r}")
        for f in fields(options):
            value = getattr(options, f.name)
            if f.metadata.get("path") and value:
                try:
                    resolve_path(value, cfg.resolved_data_root())
                except ConfigError as e:
                    raise ConfigError(f"config key '{key}.{f.name}' (task {task.name!r}): {e}") from None


def build_dataset(
    task: TaskConfig,
    split: Literal["train", "eval"],
    tokenizer: ClipTokenizer,
    model_cfg: ModelConfig | None = None,
    data_root: str = "",
    num_classes: int | None = None,
) -> Dataset:
    """The dataset of `task.train_data` (split 'train') or `task.eval_data` (split 'eval').

    `num_classes` (the size of the task's target set), when given, is checked against the labels
    the annotations list, so a class-name file that does not match the data fails here.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    source = task.train_data if split == "train" else task.eval_data
    if source is None:
        raise ValueError(f"task {task.name!r} has no {'train_data' if split == 'train' else 'eval_data'}")
    fmt = source.format
    from .datasets.base import read_options
    from .readers import READERS, ReaderContext  # the readers pull in media libraries: imported on use

    reader = READERS.get(fmt)
    if reader is None:
        raise ValueError(f"task {task.name!r}: unknown data format {fmt!r}")
    spec = task_spec(task.type)
    if fmt not in spec.formats:  # the formats a task type reads are part of its TaskSpec
        raise ValueError(f"task {task.name!r}: data format {fmt!r} does not feed {task.type} "
                         f"(it reads {list(spec.formats)})")
    side = "train_data" if split == "train" else "eval_data"
    options = read_options(reader.options, source, f"{side}.options", f"task {task.name!r}")
    context = ReaderContext(task, replace(source, options=options), split, tokenizer, model_cfg, data_root)
    dataset = reader.build(context)
    if num_classes is not None:
        dataset.check_num_classes(num_classes, f"target set {task.target_set!r}")
    return dataset
