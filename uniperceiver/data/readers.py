"""The data-reader registry: one `Reader` per `DataSourceConfig.format`.

A reader is its typed options (a dataclass, so `options:` in a config is validated like every
other key: an unknown one fails naming the key, with a suggestion) and a function that builds the
dataset from a `ReaderContext`. Adding a format: write the dataset (a `BaseDataset` with its
`Options`), add its row to `READERS`, its name to `config.schema.DataFormat`, and run
`python -m uniperceiver.data.readers` to refresh the README's options table
(tests/data/test_data_reader_registry.py checks all three agree).
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch.utils.data import Dataset

from ..config.model import ModelConfig
from ..config.schema import DataSourceConfig, TaskConfig
from ..tokenization import ClipTokenizer
from ..utils.task_registry import task_spec
from . import datasets as ds
from .datasets.base import NoOptions
from .datasets.demo import DemoOptions, build_demo_dataset
from .transforms import build_image_transform, build_video_transform

__all__ = ["READERS", "Reader", "ReaderContext", "options_table"]


@dataclass(frozen=True)
class ReaderContext:
    """What a reader may use: the task, its data source (options already typed), the side."""

    task: TaskConfig
    source: DataSourceConfig
    split: str  # 'train' | 'eval'
    tokenizer: ClipTokenizer
    model_cfg: ModelConfig | None
    data_root: str

    @property
    def training(self) -> bool:
        return self.split == "train"

    def image_transform(self):
        return build_image_transform(self.task, self.model_cfg, self.training)

    def video_transform(self):
        return build_video_transform(self.task, self.model_cfg, self.training)


@dataclass(frozen=True)
class Reader:
    options: type  # the dataclass of the format's `options`
    build: Callable[[ReaderContext], Dataset]
    summary: str  # one line for the options table


def _jsonl(c: ReaderContext) -> Dataset:
    visual = task_spec(c.task.type).modality
    t = c.task
    return ds.JsonlDataset(
        c.source, c.training, task_type=t.type,
        image_transform=c.image_transform() if visual == "image" else None,
        video_transform=c.video_transform() if visual == "video" else None,
        tokenizer=c.tokenizer, max_len=t.max_text_len, frames=t.frames, frame_stride=t.frame_stride,
        eval_clips=t.eval_clips, mlm_probability=t.mlm_probability, data_root=c.data_root,
    )


READERS: Mapping[str, Reader] = MappingProxyType({
    "imagenet": Reader(
        NoOptions, lambda c: ds.ImageNetDataset(c.source, c.image_transform(), c.training, c.data_root),
        "ImageNet-1k: `meta/{split}.txt` lines `relpath class_id`, images at `root/{split}/relpath`"),
    "imagenet22k": Reader(
        NoOptions, lambda c: ds.ImageNet22kDataset(c.source, c.image_transform(), c.training, c.data_root),
        "ImageNet-22k: file list of `wnid idx class_id`, images at `root/wnid/wnid_idx.JPEG`"),
    "kinetics": Reader(
        ds.KineticsOptions,
        lambda c: ds.KineticsDataset(c.source, c.video_transform(), c.training, frames=c.task.frames,
                                     frame_stride=c.task.frame_stride, eval_clips=c.task.eval_clips,
                                     data_root=c.data_root),
        "Kinetics: `annotation.json` + `category_mapping.txt`, videos `root/{subset}/label/name`"),
    "msvd": Reader(
        ds.MsvdOptions,
        lambda c: ds.MsvdDataset(c.source, c.video_transform(), c.training, frames=c.task.frames,
                                 frame_stride=c.task.frame_stride, data_root=c.data_root),
        "MSVD: `caption_msvd_{split}_cocostyle.json`, videos `root/<file_name>`"),
    "coco_karpathy": Reader(
        ds.CocoKarpathyOptions,
        lambda c: ds.CocoKarpathyDataset(c.source, c.image_transform(), c.training, c.data_root),
        "COCO captions: `captions_{train113k,val5k,test5k}.json` or Karpathy's `dataset_coco.json`"),
    "flickr30k": Reader(
        NoOptions, lambda c: ds.Flickr30kDataset(c.source, c.image_transform(), c.training, c.data_root),
        "Flickr30k: `all_data_final_{train,val_set0,test_set0}_2014.jsonline`"),
    "mlm_corpus": Reader(
        ds.MLMCorpusOptions,
        lambda c: ds.MLMCorpusDataset(c.source, c.tokenizer, c.training, max_len=c.task.max_text_len,
                                      probability=c.task.mlm_probability, data_root=c.data_root),
        "plain text, one line per document piece (MLM)"),
    "glue": Reader(
        ds.GlueOptions,
        lambda c: ds.GlueDataset(c.source, c.tokenizer, c.training, max_len=c.task.max_text_len,
                                 data_root=c.data_root),
        "GLUE-style TSV (sentence[, sentence2], label) with the release's prompts"),
    "jsonl": Reader(ds.JsonlOptions, _jsonl,
                    "our manifest: one JSON object a line (`image` | `video` | `text`, `label` | `caption(s)`)"),
    "demo": Reader(
        DemoOptions, lambda c: build_demo_dataset(c.task, c.source, c.split, c.tokenizer, c.model_cfg, c.data_root),
        "the embedded offline demo data (emoji, Fashion-MNIST, WordNet glosses)"),
})


def _type_text(tp: typing.Any) -> str:
    return str(tp).replace("typing.", "").replace("NoneType", "None") if not isinstance(tp, type) else tp.__name__


def options_table() -> str:
    """The README's table of every reader's options (Markdown), from the dataclasses."""
    rows = ["| format | option | type | default | meaning |", "|---|---|---|---|---|"]
    for name, reader in READERS.items():
        hints = typing.get_type_hints(reader.options)
        fields = dataclasses.fields(reader.options)
        summary = reader.summary.replace("|", "\\|") + ("" if fields else "; no options")
        rows.append(f"| `{name}` | | | | {summary} |")
        for f in fields:
            cells = [f"`{f.name}`", f"`{_type_text(hints[f.name])}`", f"`{f.default!r}`", f.metadata.get("doc", "")]
            rows.append("| | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(options_table())
