"""ImageNet-1k (`meta/{train,val}.txt`) and ImageNet-22k (file list) readers (OFFICIAL.md 4.2).

ImageNet-1k: `annotations` is the list file, or a folder holding `{split}.txt` (default
`root/meta`); lines are `relpath class_id`, images at `root/{split}/relpath`.
ImageNet-22k: `annotations` is the file list (or a folder holding
`imagenet_22k_filelist_short.txt`); lines are `wnid idx class_id`, images at
`root/wnid/wnid_idx.JPEG`.
Samples: `image` [3, S, S] (ImageNet mean/std), `label`, `id` (the relative path).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ...config.schema import DataSourceConfig
from ..media import load_image
from .base import BaseDataset, LineErrors, Record, pick_file, read_lines


def _parse_label(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 0 else None


class ImageNetDataset(BaseDataset):
    def __init__(self, source: DataSourceConfig, transform: Callable, training: bool, data_root: str = "") -> None:
        super().__init__(source, training, data_root, name=f"imagenet[{source.split}]")
        self.transform = transform
        split = source.split
        ann = self.annotations or os.path.join(self.root, "meta")
        ann_file = pick_file(ann, [f"{split}.txt"], "ImageNet list")
        self.image_dir = os.path.join(self.root, split)
        errors = LineErrors(source.on_error)
        records = []
        for no, line in enumerate(read_lines(ann_file, "ImageNet list"), start=1):
            if not line.strip():
                continue
            fields = line.split()
            label = _parse_label(fields[-1]) if len(fields) >= 2 else None
            if len(fields) < 2 or label is None:
                errors.report(ann_file, no, f"expected 'relative/path.JPEG class_id' (an integer >= 0), got {line!r}")
                continue
            # Paths may contain spaces: everything before the last field is the path.
            rel = line.rsplit(None, 1)[0].strip()
            records.append(Record({"path": rel, "label": label}, ann_file, no))
        self._finish(records, errors)

    def labels(self) -> list[int]:
        return [r.data["label"] for r in self.records]

    def load(self, record: Record, index: int) -> dict[str, Any]:
        path = os.path.join(self.image_dir, record.data["path"])
        img = load_image(path, record.annotation, record.line)
        return {"image": self.transform(img), "label": record.data["label"], "id": record.data["path"]}


class ImageNet22kDataset(BaseDataset):
    def __init__(self, source: DataSourceConfig, transform: Callable, training: bool, data_root: str = "") -> None:
        super().__init__(source, training, data_root, name=f"imagenet22k[{source.split}]")
        self.transform = transform
        ann_file = pick_file(self.annotations or self.root, ["imagenet_22k_filelist_short.txt",
                                                             "imagenet_22k_filelist.txt"], "ImageNet-22k file list")
        errors = LineErrors(source.on_error)
        records = []
        for no, line in enumerate(read_lines(ann_file, "ImageNet-22k file list"), start=1):
            if not line.strip():
                continue
            fields = line.split()
            label = _parse_label(fields[2]) if len(fields) == 3 else None
            if label is None:
                errors.report(ann_file, no, f"expected 'wnid idx class_id' (3 fields, integer class_id), got {line!r}")
                continue
            wnid, idx = fields[0], fields[1]
            records.append(Record({"path": f"{wnid}/{wnid}_{idx}.JPEG", "label": label}, ann_file, no))
        self._finish(records, errors)

    def labels(self) -> list[int]:
        return [r.data["label"] for r in self.records]

    def load(self, record: Record, index: int) -> dict[str, Any]:
        path = os.path.join(self.root, record.data["path"])
        img = load_image(path, record.annotation, record.line)
        return {"image": self.transform(img), "label": record.data["label"], "id": record.data["path"]}
