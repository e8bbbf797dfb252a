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
    """ImageNet-1k: a list of `relpath class_id` lines, images at `root/{split}/relpath`. The
    ImageNet-22k reader differs only in where the list is and how a line reads (`_list_file`,
    `_parse`)."""

    what = "ImageNet list"
    line_format = "'relative/path.JPEG class_id' (an integer >= 0)"

    def __init__(self, source: DataSourceConfig, transform: Callable, training: bool, data_root: str = "") -> None:
        super().__init__(source, training, data_root, name=f"{source.format}[{source.split}]")
        self.transform = transform
        ann_file = self._list_file()
        errors = LineErrors(source.on_error)
        records = []
        for no, line in enumerate(read_lines(ann_file, self.what), start=1):
            if not line.strip():
                continue
            parsed = self._parse(line)
            if parsed is None:
                errors.report(ann_file, no, f"expected {self.line_format}, got {line!r}")
                continue
            records.append(Record({"path": parsed[0], "label": parsed[1]}, ann_file, no))
        self._finish(records, errors)

    def _list_file(self) -> str:
        """The list file; sets `image_dir`, the folder the listed paths are relative to."""
        self.image_dir = os.path.join(self.root, self.source.split)
        return pick_file(self.annotations or os.path.join(self.root, "meta"), [f"{self.source.split}.txt"], self.what)

    @staticmethod
    def _parse(line: str) -> tuple[str, int] | None:
        fields = line.split()
        label = _parse_label(fields[-1]) if len(fields) >= 2 else None
        if label is None:
            return None
        # Paths may contain spaces: everything before the last field is the path.
        return line.rsplit(None, 1)[0].strip(), label

    def labels(self) -> list[int]:
        return [r.data["label"] for r in self.records]

    def load(self, record: Record, index: int) -> dict[str, Any]:
        path = os.path.join(self.image_dir, record.data["path"])
        img = load_image(path, record.annotation, record.line)
        return {"image": self.transform(img), "label": record.data["label"], "id": record.data["path"]}


class ImageNet22kDataset(ImageNetDataset):
    """ImageNet-22k: a file list of `wnid idx class_id` lines, images at `root/wnid/wnid_idx.JPEG`."""

    what = "ImageNet-22k file list"
    line_format = "'wnid idx class_id' (3 fields, integer class_id)"

    def _list_file(self) -> str:
        self.image_dir = self.root
        return pick_file(self.annotations or self.root, ["imagenet_22k_filelist_short.txt",
                                                         "imagenet_22k_filelist.txt"], self.what)

    @staticmethod
    def _parse(line: str) -> tuple[str, int] | None:
        fields = line.split()
        label = _parse_label(fields[2]) if len(fields) == 3 else None
        if label is None:
            return None
        wnid, idx = fields[0], fields[1]
        return f"{wnid}/{wnid}_{idx}.JPEG", label
