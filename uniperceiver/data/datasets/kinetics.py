"""Kinetics-style video classification (the release's `VideoDataSet`, OFFICIAL.md 4.2).

- `annotations`: `annotation.json` (or a folder holding it) =
  `{"database": {name: {"subset": "training"|"validation", "annotations": {"label": ...}}}}`.
- `category_mapping.txt` (beside the annotation file, or `options.category_mapping`): lines
  `class name<TAB>index`. Labels are matched with spaces and underscores treated alike.
- Videos: `root/{training|validation}/{label}/{name}` (+ `options.extension`, else the common
  extensions are tried). The subset is `training` for split 'train', else `validation`
  (override with `options.subset`). An optional `exclude_list.txt` beside the annotations lists
  file names to leave out (as the release).
- Frames: `task.frames` frames, `task.frame_stride` apart at 30 fps; training draws a random
  start, evaluation takes `eval_clips` interleaved clips from the centre x `eval_crops` crops.
Samples: `video` [T, 3, S, S] (mean = std = 0.5), or [V, T, 3, S, S] with V = crops x clips
views (crop-major) in multi-view evaluation; `label`; `id` (the video name).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ...config.schema import DataSourceConfig
from ..errors import DataError, malformed
from ..media import read_video_frames
from ..transforms import VideoTransform
from .base import BaseDataset, LineErrors, Record, option, pick_file, read_lines


def load_video_views(path: str, transform: VideoTransform, frames: int, frame_stride: int, training: bool,
                     clips: int, annotation: str | None, line: int | None) -> Tensor:
    """Decode and transform one video: [T, 3, S, S], or [crops * clips, T, 3, S, S] views."""
    clips = 1 if training else clips
    raw = read_video_frames(path, frames, frame_stride, training, clips, annotation, line)
    x = transform(raw)  # [clips*T, 3, S, S] or [crops, clips*T, 3, S, S]
    if x.dim() == 4:
        x = x.unsqueeze(0)
    if clips > 1:
        # 'v2' views: frame j of the long clip goes to clip j % clips (interleaved clips).
        c = x.shape[0]
        x = x.reshape(c, frames, clips, *x.shape[-3:]).transpose(1, 2).reshape(c * clips, frames, *x.shape[-3:])
    return x[0] if x.shape[0] == 1 else x.contiguous()


def _line_of(raw: str, key: str) -> int:
    """1-based line of the first `"key":` in a JSON text (for error messages only)."""
    pos = raw.find(json.dumps(key) + ":")
    if pos < 0:
        pos = raw.find(json.dumps(key))
    return raw.count("\n", 0, max(pos, 0)) + 1


def _norm(label: str) -> str:
    return label.strip().replace(" ", "_")


@dataclass
class KineticsOptions:
    extension: str = option("", "video file extension ('' = the common ones are tried)")
    subset: str | None = option(None, "annotation subset and video folder (default `training` for split train, "
                                      "else `validation`)")
    annotation_file: str = option("annotation.json", "the annotation file's name when `annotations` is a folder")
    category_mapping: str | None = option(None, "the `class name<TAB>index` file (default `category_mapping.txt` "
                                                "beside the annotations)", path=True)


class KineticsDataset(BaseDataset):
    Options = KineticsOptions

    def __init__(self, source: DataSourceConfig, transform: VideoTransform, training: bool, *, frames: int,
                 frame_stride: int, eval_clips: int = 1, data_root: str = "") -> None:
        super().__init__(source, training, data_root, name=f"kinetics[{source.split}]")
        self.transform = transform
        self.frames = frames
        self.frame_stride = frame_stride
        self.eval_clips = eval_clips
        opts = self.options
        self.extension = opts.extension
        subset = opts.subset or ("training" if source.split in ("train", "training") else "validation")
        self.subset = subset
        ann_file = pick_file(self.annotations or self.root, [opts.annotation_file], "Kinetics annotation file")
        cat_file = self.path(opts.category_mapping) if opts.category_mapping else os.path.join(
            os.path.dirname(ann_file), "category_mapping.txt")
        self.category_file = cat_file
        self.class_names, cls2idx = self._read_categories(cat_file, source.on_error)
        self.num_classes = len(self.class_names)
        self.video_dir = os.path.join(self.root, subset)

        exclude: set[str] = set()
        exclude_file = os.path.join(os.path.dirname(ann_file), "exclude_list.txt")
        if os.path.isfile(exclude_file):
            exclude = {ln.strip() for ln in read_lines(exclude_file, "exclude list") if ln.strip()}

        try:
            with open(ann_file, encoding="utf-8") as fh:
                raw = fh.read()
            database = json.loads(raw)["database"]
        except FileNotFoundError:
            raise DataError(f"Kinetics annotation file {ann_file} not found", file=ann_file) from None
        except json.JSONDecodeError as exc:
            raise malformed(ann_file, exc.lineno, f"invalid JSON: {exc.msg}") from exc
        except (KeyError, TypeError):
            raise DataError(f"{ann_file}: expected {{\"database\": {{name: {{...}}}}}}", file=ann_file) from None
        if not isinstance(database, dict):
            raise DataError(f"{ann_file}: 'database' must map video names to entries", file=ann_file)

        errors = LineErrors(source.on_error)
        records = []
        for name, info in database.items():
            try:
                entry_subset = info["subset"]
                label = info["annotations"]["label"]
            except (KeyError, TypeError):
                errors.report(ann_file, _line_of(raw, name), f"entry {name!r}: expected {{\"subset\": ..., "
                                            f"\"annotations\": {{\"label\": ...}}}}, got {info!r}"[:300])
                continue
            if entry_subset != subset:
                continue
            if os.path.basename(name + self.extension) in exclude:
                continue
            if _norm(str(label)) not in cls2idx:
                errors.report(ann_file, _line_of(raw, name), f"entry {name!r}: label {label!r} is not in {cat_file}")
                continue
            records.append(Record({"name": name, "label_name": str(label), "label": cls2idx[_norm(str(label))]},
                                  ann_file, None, {"entry": name}))
        self._finish(records, errors)

    @staticmethod
    def _read_categories(path: str, on_error: str) -> tuple[list[str], dict[str, int]]:
        errors = LineErrors(on_error)
        pairs = []
        for no, line in enumerate(read_lines(path, "Kinetics category mapping"), start=1):
            if not line.strip():
                continue
            fields = line.rsplit("\t", 1)
            if len(fields) != 2 or not fields[1].strip().isdigit():
                errors.report(path, no, f"expected 'class name<TAB>index', got {line!r}")
                continue
            pairs.append((fields[0].strip(), int(fields[1])))
        indices = sorted(i for _, i in pairs)
        if indices != list(range(len(pairs))):
            raise DataError(f"{path}: class indices must be 0..{len(pairs) - 1}, each once", file=path)
        names = [""] * len(pairs)
        for name, i in pairs:
            names[i] = name
        return names, {_norm(n): i for n, i in pairs}

    def labels(self) -> list[int]:
        return [r.data["label"] for r in self.records]

    def check_num_classes(self, num_classes: int, what: str = "the target set") -> None:
        if len(self.class_names) != num_classes:
            raise DataError(
                f"{self.name}: {self.category_file} lists {len(self.class_names)} classes but {what} has "
                f"{num_classes} names; the class-name file must list the same classes in the same order",
                file=self.category_file,
            )
        super().check_num_classes(num_classes, what)

    def load(self, record: Record, index: int) -> dict[str, Any]:
        d = record.data
        path = os.path.join(self.video_dir, d["label_name"], d["name"] + self.extension)
        where = f"{record.annotation} entry {d['name']!r}"
        video = load_video_views(path, self.transform, self.frames, self.frame_stride, self.training,
                                 self.eval_clips, where, None)
        return {"video": video, "label": d["label"], "id": d["name"]}


__all__ = ["KineticsDataset", "load_video_views"]
