"""MSVD video captioning and retrieval (the release's layout, OFFICIAL.md 4.3).

`annotations`: `caption_msvd_{split}_cocostyle.json` (COCO caption format:
`{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`), or the folder
holding it (split 'train' / 'val' / 'test'). Videos at `root/<file_name>` (+ `options.extension`,
else the common video extensions are tried). Frames: `task.frames` frames `task.frame_stride`
apart at 30 fps, random start in training, centre in evaluation; mean = std = 0.5.

Samples: `video` [T, 3, S, S], `id`, and one `caption` drawn per sample in training / every
ground truth in `captions` in evaluation.
"""
from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from typing import Any

from dataclasses import dataclass

from ...config.schema import DataSourceConfig
from ..errors import DataError, malformed
from ..media import resolve_video_path
from ..transforms import VideoTransform
from .base import BaseDataset, LineErrors, Record, option
from .kinetics import load_video_views


@dataclass
class MsvdOptions:
    extension: str = option("", "video file extension added to `file_name` ('' = as listed, else the common ones tried)")


class MsvdDataset(BaseDataset):
    Options = MsvdOptions

    def __init__(self, source: DataSourceConfig, transform: VideoTransform, training: bool, *, frames: int,
                 frame_stride: int, data_root: str = "") -> None:
        super().__init__(source, training, data_root, name=f"msvd[{source.split}]")
        self.transform, self.frames, self.frame_stride = transform, frames, frame_stride
        self.extension = self.options.extension
        ann = self.annotations
        if os.path.isdir(ann):
            ann = os.path.join(ann, f"caption_msvd_{source.split}_cocostyle.json")
        try:
            with open(ann, encoding="utf-8") as fh:
                raw = fh.read()
            data = json.loads(raw)
            images, annotations = data["images"], data["annotations"]
        except FileNotFoundError:
            raise DataError(f"MSVD annotation file {ann} not found", file=ann) from None
        except json.JSONDecodeError as exc:
            raise malformed(ann, exc.lineno, f"invalid JSON: {exc.msg}") from exc
        except (KeyError, TypeError):
            raise DataError(f"{ann}: expected COCO caption format {{\"images\": [...], \"annotations\": [...]}}",
                            file=ann) from None
        errors = LineErrors(source.on_error)
        captions: dict[Any, list[str]] = defaultdict(list)
        for i, a in enumerate(annotations):
            if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
                errors.report(ann, 1, f"annotations[{i}]: expected {{\"image_id\", \"caption\"}}, got {a!r}"[:300])
                continue
            captions[a["image_id"]].append(a["caption"])
        records = []
        for i, img in enumerate(images):
            if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
                errors.report(ann, 1, f"images[{i}]: expected {{\"id\", \"file_name\"}}, got {img!r}"[:300])
                continue
            if not captions.get(img["id"]):
                errors.report(ann, 1, f"images[{i}] (id {img['id']!r}) has no caption")
                continue
            records.append(Record({"id": img["id"], "file": img["file_name"], "captions": captions[img["id"]]},
                                  ann, None, {"entry": i}))
        self._finish(records, errors)

    def load(self, record: Record, index: int) -> dict[str, Any]:
        d = record.data
        listed = f"{record.annotation} images[{record.extra['entry']}]"
        path = resolve_video_path(os.path.join(self.root, d["file"]) + self.extension, listed, None)
        video = load_video_views(path, self.transform, self.frames, self.frame_stride, self.training, 1,
                                 listed, None)
        sample: dict[str, Any] = {"video": video, "id": d["id"]}
        if self.training:
            sample["caption"] = random.choice(d["captions"])
        else:
            sample["captions"] = list(d["captions"])
        return sample
