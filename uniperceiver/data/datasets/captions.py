"""Image-caption datasets for captioning and retrieval: COCO (Karpathy split) and Flickr30k.

COCO (`coco_karpathy`), `annotations` is a JSON file, or a folder holding the files of a split.
Two shapes are read:
- the common Karpathy file (`dataset_coco.json`): `{"images": [{"filepath", "filename",
  "sentences": [{"raw"}], "split", "cocoid"}]}`; split 'train' takes Karpathy `train` + `restval`
  (113k), 'val' takes `val`, 'test' takes `test` (`options.splits` overrides);
- the release's `captions_{train113k,val5k,test5k}.json` (COCO caption format):
  `{"images": [{"id", "file_path", "file_name"}], "annotations": [{"image_id", "caption", "id"}]}`;
  a folder gives train = train113k + val5k (as the release), val = val5k, test = test5k.
Images at `root/filepath/filename`.

Flickr30k (`flickr30k`), JSON lines `{"id", "img_path", "sentences": [...]}` (the release's
`all_data_final_{train,val_set0,test_set0}_2014.jsonline`; a folder gives train = train + val_set0,
val = val_set0, test = test_set0). `image`/`captions` keys are accepted as well. Images at
`root/img_path`.

Samples: `image` [3, S, S] (ImageNet mean/std), `id`, and in training one `caption` drawn per
sample (from the sample's seed), in evaluation every ground truth in `captions`.
"""
from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...config.schema import DataSourceConfig
from ..errors import DataError, malformed
from ..media import load_image
from .base import BaseDataset, LineErrors, Record, option, read_lines


class ImageCaptionDataset(BaseDataset):
    """Shared `load`: image + caption (training) / captions (evaluation)."""

    def load(self, record: Record, index: int) -> dict[str, Any]:
        d = record.data
        listed = record.annotation
        if listed is not None and "entry" in record.extra:
            listed = f"{listed} entry {record.extra['entry']}"
        img = load_image(os.path.join(self.root, d["path"]), listed, record.line)
        sample: dict[str, Any] = {"image": self.transform(img), "id": d["id"]}
        if self.training:
            sample["caption"] = random.choice(d["captions"])
        else:
            sample["captions"] = list(d["captions"])
        return sample


def _files_for_split(path: str, split: str, layout: dict[str, list[str]], what: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"{what} {path or '(empty path)'} not found", file=path)
    if split not in layout:
        raise DataError(f"{what}: split {split!r} has no default files; use one of {sorted(layout)} "
                        "or point `annotations` at a file", file=path)
    for group in layout[split]:
        files = [os.path.join(path, f) for f in group.split("+")]
        if all(os.path.isfile(f) for f in files):
            return files
    raise DataError(f"{what}: none of {layout[split]} found in {path}", file=path)


_COCO_LAYOUT = {
    "train": ["captions_train113k.json+captions_val5k.json", "dataset_coco.json"],
    "val": ["captions_val5k.json", "dataset_coco.json"],
    "test": ["captions_test5k.json", "dataset_coco.json"],
}
_KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


@dataclass
class CocoKarpathyOptions:
    splits: list[str] | None = option(None, "Karpathy splits to take from `dataset_coco.json` (default: train -> "
                                            "train + restval, val -> val, test -> test)")


class CocoKarpathyDataset(ImageCaptionDataset):
    Options = CocoKarpathyOptions

    def __init__(self, source: DataSourceConfig, transform: Callable, training: bool, data_root: str = "") -> None:
        super().__init__(source, training, data_root, name=f"coco_karpathy[{source.split}]")
        self.transform = transform
        files = _files_for_split(self.annotations, source.split, _COCO_LAYOUT, "COCO caption annotations")
        errors = LineErrors(source.on_error)
        records: list[Record] = []
        for file in files:
            try:
                with open(file, encoding="utf-8") as fh:
                    data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise malformed(file, exc.lineno, f"invalid JSON: {exc.msg}") from exc
            if not isinstance(data, dict) or "images" not in data:
                raise DataError(f"{file}: expected a JSON object with 'images'", file=file)
            if "annotations" in data:
                records += self._release_form(file, data, errors)
            else:
                splits = self.options.splits or _KARPATHY_SPLITS.get(source.split, (source.split,))
                records += self._karpathy_form(file, data, set(splits), errors)
        self._finish(records, errors)

    @staticmethod
    def _karpathy_form(file: str, data: dict, splits: set[str], errors: LineErrors) -> list[Record]:
        records = []
        for no, img in enumerate(data["images"], start=1):
            try:
                if img.get("split") not in splits:
                    continue
                captions = [s["raw"] for s in img["sentences"]]
                path = os.path.join(img.get("filepath", ""), img["filename"])
                sid = img.get("cocoid", img.get("imgid", img["filename"]))
            except (KeyError, TypeError, AttributeError):
                errors.report(file, no, f"image entry {no}: expected 'filename', 'sentences' [{{'raw'}}] and "
                                        "'split' (Karpathy format)")
                continue
            if not captions:
                errors.report(file, no, f"image entry {no} ({path}) has no sentences")
                continue
            records.append(Record({"path": path, "captions": captions, "id": sid}, file, None, {"entry": no}))
        return records

    @staticmethod
    def _release_form(file: str, data: dict, errors: LineErrors) -> list[Record]:
        by_image: dict[Any, list[tuple[Any, str]]] = defaultdict(list)
        for no, ann in enumerate(data["annotations"], start=1):
            try:
                by_image[ann["image_id"]].append((ann.get("id", no), str(ann["caption"])))
            except (KeyError, TypeError):
                errors.report(file, no, f"annotation entry {no}: expected 'image_id' and 'caption'")
        records = []
        for no, img in enumerate(data["images"], start=1):
            try:
                iid = img["id"]
                path = os.path.join(img.get("file_path", ""), img["file_name"])
            except (KeyError, TypeError):
                errors.report(file, no, f"image entry {no}: expected 'id', 'file_path' and 'file_name'")
                continue
            caps = by_image.get(iid)
            if not caps:
                continue  # the release lists only images that have captions
            captions = [c for _, c in sorted(caps, key=lambda t: t[0])]  # by annotation id, as the release
            records.append(Record({"path": path, "captions": captions, "id": iid}, file, None, {"entry": no}))
        return records


_FLICKR_LAYOUT = {
    "train": ["all_data_final_train_2014.jsonline+all_data_final_val_set0_2014.jsonline"],
    "val": ["all_data_final_val_set0_2014.jsonline"],
    "test": ["all_data_final_test_set0_2014.jsonline"],
}


class Flickr30kDataset(ImageCaptionDataset):
    def __init__(self, source: DataSourceConfig, transform: Callable, training: bool, data_root: str = "") -> None:
        super().__init__(source, training, data_root, name=f"flickr30k[{source.split}]")
        self.transform = transform
        files = _files_for_split(self.annotations, source.split, _FLICKR_LAYOUT, "Flickr30k annotations")
        errors = LineErrors(source.on_error)
        records = []
        for file in files:
            for no, line in enumerate(read_lines(file, "Flickr30k annotations"), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    path = obj.get("img_path", obj.get("image"))
                    captions = obj.get("sentences", obj.get("captions"))
                    if isinstance(captions, str):
                        captions = [captions]
                    ok = isinstance(path, str) and isinstance(captions, list) and captions and all(
                        isinstance(c, str) for c in captions)
                except (json.JSONDecodeError, AttributeError):
                    ok = False
                if not ok:
                    errors.report(file, no, "expected a JSON object with 'img_path' (str) and 'sentences' "
                                            f"(non-empty list of str), got {line[:200]!r}")
                    continue
                sid = obj.get("id", f"{os.path.basename(file)}:{no}")
                records.append(Record({"path": path, "captions": captions, "id": sid}, file, no))
        self._finish(records, errors)
