"""Our own manifest: one JSON object per line.

Keys: exactly one input, `image` | `video` (paths relative to `root`) | `text`; and the targets the
task needs: `label` (int, or a class name looked up in `options.class_names`, a class-name file
relative to the data root, or `options.classes`, an inline list; synonyms `a|b` all match),
`caption` (str), `captions` (list of str); optional `id` (default: the line number).

Samples follow the common convention: `image` [3, S, S] / `video` [T, 3, S, S] (or views),
`label`, `caption` (training: `caption`, else one drawn from `captions` per sample seed) /
`captions` (evaluation: all of them), `id`. Text inputs: `text` for MLM (masked like the corpus)
and text classification (`options.template` prompt, as the GLUE reader), else the raw string.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...config.schema import DataSourceConfig
from ...utils.task_registry import task_spec
from ...tokenization import ClipTokenizer
from ..errors import DataError
from ..media import load_image
from ..text import build_prompt, mask_words, split_words, truncate_keep_last
from .base import BaseDataset, LineErrors, Record, option, read_lines
from .glue import GLUE_PROMPTS
from .kinetics import load_video_views

_INPUTS = ("image", "video", "text")


@dataclass
class JsonlOptions:
    class_names: str | None = option(None, "class-name file (one class a line, synonyms `a|b`) for name labels, "
                                           "relative to the data root", path=True)
    classes: list[str] | None = option(None, "the class names inline, instead of `class_names`")
    template: str | None = option(None, "text classification prompt with `{s1}` and one `<|spe|>` "
                                        "(default: the `task`'s)")
    task: str = option("SST-2", "the GLUE task whose prompt is the default `template`")

    def __post_init__(self) -> None:
        if self.task not in GLUE_PROMPTS:
            raise ValueError(f"options.task {self.task!r} is not one of {sorted(GLUE_PROMPTS)}")


class JsonlDataset(BaseDataset):
    Options = JsonlOptions

    def __init__(self, source: DataSourceConfig, training: bool, *, task_type: str,
                 image_transform: Callable | None = None, video_transform: Callable | None = None,
                 tokenizer: ClipTokenizer | None = None, max_len: int = 50, frames: int = 1,
                 frame_stride: int = 32, eval_clips: int = 1, mlm_probability: float = 0.15,
                 data_root: str = "") -> None:
        super().__init__(source, training, data_root, name=f"jsonl[{source.split}]")
        self.task_type = task_type
        self.spec = task_spec(task_type)
        self.image_transform = image_transform
        self.video_transform = video_transform
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.frames, self.frame_stride, self.eval_clips = frames, frame_stride, eval_clips
        self.mlm_probability = mlm_probability
        opts = self.options
        self.template = opts.template or GLUE_PROMPTS[opts.task][0]
        self.class_names = self._classes(opts)
        self.num_classes = len(self.class_names) if self.class_names else None
        lookup = {n: i for i, names in enumerate(self.class_names or []) for n in names}

        ann_file = self.annotations
        if not ann_file or os.path.isdir(ann_file):
            ann_file = os.path.join(ann_file or self.root, f"{source.split}.jsonl")
        errors = LineErrors(source.on_error)
        records = []
        for no, line in enumerate(read_lines(ann_file, "JSONL manifest"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.report(ann_file, no, f"invalid JSON ({exc.msg}): {line[:200]!r}")
                continue
            problem = self._check(obj, lookup)
            if problem:
                errors.report(ann_file, no, f"{problem}: {line[:200]!r}")
                continue
            if isinstance(obj.get("label"), str):
                obj["label"] = lookup[obj["label"]]
            obj.setdefault("id", no)
            records.append(Record(obj, ann_file, no))
        self._finish(records, errors)
        # Media paths are relative to `root`, or to the manifest's folder when no root is set.
        self.media_root = self.root or os.path.dirname(ann_file)

    def _classes(self, opts: JsonlOptions) -> list[list[str]] | None:
        from ..target_sets import read_class_names

        if opts.class_names:
            return read_class_names(self.path(opts.class_names))
        if opts.classes:
            return [[n.strip() for n in str(c).split("|")] for c in opts.classes]
        return None

    def _check(self, obj: Any, lookup: dict[str, int]) -> str | None:
        """What is wrong with one manifest entry, or None."""
        if not isinstance(obj, dict):
            return "expected a JSON object"
        inputs = [k for k in _INPUTS if k in obj]
        if len(inputs) != 1 or not isinstance(obj[inputs[0]], str):
            return "expected exactly one of 'image', 'video', 'text' (a string)"
        if self.spec.class_labels:
            label = obj.get("label")
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                return "expected 'label' (an integer or a class name)"
            if isinstance(label, int) and label < 0:
                return f"label {label} is negative"
            if isinstance(label, str) and label not in lookup:
                if not lookup:
                    return f"label {label!r} is a name, but no options.class_names / options.classes are given"
                return f"label {label!r} is not a known class name"
        if self.spec.kind in ("caption", "retrieval"):
            caps = obj.get("captions", [obj["caption"]] if isinstance(obj.get("caption"), str) else None)
            if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
                return "expected 'caption' (str) or 'captions' (non-empty list of str)"
            obj["captions"] = caps
        return None

    def labels(self) -> list[int] | None:
        if not self.spec.class_labels:
            return None
        return [r.data["label"] for r in self.records]

    def load(self, record: Record, index: int) -> dict[str, Any]:
        d = record.data
        sample: dict[str, Any] = {"id": d["id"]}
        if "image" in d:
            if self.image_transform is None:
                raise DataError(f"{self.name}: task type {self.task_type} takes no images "
                                f"({record.annotation}:{record.line})")
            img = load_image(os.path.join(self.media_root, d["image"]), record.annotation, record.line)
            sample["image"] = self.image_transform(img)
        elif "video" in d:
            if self.video_transform is None:
                raise DataError(f"{self.name}: task type {self.task_type} takes no videos "
                                f"({record.annotation}:{record.line})")
            sample["video"] = load_video_views(os.path.join(self.media_root, d["video"]), self.video_transform,
                                               self.frames, self.frame_stride, self.training, self.eval_clips,
                                               record.annotation, record.line)
        else:
            self._text(d["text"], sample)
        if "label" in d:
            sample["label"] = int(d["label"])
        if "captions" in d:
            if self.training:
                sample["caption"] = random.choice(d["captions"])
            else:
                sample["captions"] = list(d["captions"])
        return sample

    def _text(self, text: str, sample: dict[str, Any]) -> None:
        if self.tokenizer is None:
            sample["text"] = text
        elif self.spec.kind == "mlm":
            words = split_words(self.tokenizer, text) + [[self.tokenizer.EOT]]
            ids, labels = mask_words(words, self.mlm_probability, len(self.tokenizer))
            sample["ids"] = truncate_keep_last(ids, self.max_len)
            sample["mlm_labels"] = truncate_keep_last(labels, self.max_len)
        elif self.spec.prompt_spe:
            sample["ids"], sample["spe_index"] = build_prompt(self.tokenizer, self.template, [text], self.max_len)
        else:
            sample["text"] = text
