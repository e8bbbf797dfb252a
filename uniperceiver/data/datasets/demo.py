"""The embedded offline demo data (`format: demo`): emoji, Fashion-MNIST and WordNet glosses.

The files ship in `uniperceiver/demo/data/` (see `uniperceiver.data.demo_files` for their
layout, licenses and split rules); `root` may point at another folder written by
`python -m uniperceiver.tools.maintainer.prepare_demo_data --out DIR`.

Options (`DataSourceConfig.options`):
- `source`: 'emoji' | 'fashion_mnist' | 'wordnet' (required).
- `subset`: emoji 'train' | 'heldout' | 'all'; fashion_mnist 'train' | 'test'; wordnet 'train' |
  'test' | 'all'. Default: `split` when it is not 'train', else 'train' in training and
  'heldout' (emoji) / 'test' in evaluation. Emoji are split by subgroup (subgroup k held out iff
  k % 5 == 4, CLDR order); WordNet lines inside each lexname (line j is test iff j % 5 == 4).
- `label` (emoji image classification): 'group' (9 classes, default) | 'subgroup' (99).
- `skin_tones` (emoji): keep skin-tone variants if the data has them (default false).
- `mode` (wordnet): 'mlm' | 'classification'; default from the task type.
- `with_lemma` (wordnet, default true): the text is 'lemma: gloss' instead of the gloss alone.
- `template` (wordnet classification): default `"{s1} <|endoftext|> It is <|spe|>. <|endoftext|>"`.

Task types and samples (every sample has `id`, an int: the row in the packaged arrays / TSV):
- emoji `image_classification`: `image` [3, S, S], `label` (group or subgroup index);
- emoji `image_caption` / `image_retrieval`: `image`, and the emoji's CLDR name ("grinning face")
  as `caption` (training) or `captions` = [name] (evaluation);
- fashion_mnist `image_classification`: `image`, `label` (0..9);
- wordnet `text_mlm`: `ids`, `mlm_labels` (text + " <|endoftext|>", whole-word masking with
  p = `task.mlm_probability`, truncated to `task.max_text_len` keeping the last id);
- wordnet `text_classification`: `ids`, `spe_index`, `label` (lexname index).

Images (32 x 32 RGB emoji, 28 x 28 grayscale Fashion-MNIST -> RGB) are resized to
S = `task.image_size` or `model.image_size` (bicubic) and normalised with the ImageNet mean/std;
there is no augmentation (an emoji flipped is often another emoji: 'left arrow'). Training
indexes with `(index, seed)`; masking draws from the per-sample RNG (`sample_rng(seed)`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ...config.model import ModelConfig
from ...config.schema import DataSourceConfig, TaskConfig
from ..demo_files import (
    demo_class_names,
    emoji_subset_indices,
    load_emoji,
    load_fashion_mnist,
    load_wordnet,
    wordnet_subset_indices,
)
from ...utils.task_registry import task_spec
from ...tokenization import ClipTokenizer
from ..errors import DataError
from ..text import build_prompt, mask_words, split_words, truncate_keep_last
from ..transforms import IMAGENET_MEAN, IMAGENET_STD, input_size
from .base import BaseDataset, Record, option, read_options

__all__ = [
    "DEMO_SOURCES",
    "DEMO_TEXT_TEMPLATE",
    "DemoImageDataset",
    "DemoTextDataset",
    "build_demo_dataset",
    "demo_class_names",
    "demo_image_transform",
]

DEMO_TEXT_TEMPLATE = "{s1} <|endoftext|> It is <|spe|>. <|endoftext|>"
# source -> task types it can feed
DEMO_SOURCES: dict[str, tuple[str, ...]] = {
    "emoji": ("image_classification", "image_caption", "image_retrieval"),
    "fashion_mnist": ("image_classification",),
    "wordnet": ("text_mlm", "text_classification"),
}
_SUBSETS = {"emoji": ("train", "heldout", "all"), "fashion_mnist": ("train", "test"),
            "wordnet": ("train", "test", "all")}
_EVAL_SUBSET = {"emoji": "heldout", "fashion_mnist": "test", "wordnet": "test"}


@dataclass
class DemoOptions:
    source: str | None = option(None, f"{' | '.join(DEMO_SOURCES)} (required)")
    subset: str | None = option(None, "emoji train / heldout / all, fashion_mnist train / test, wordnet train / test / "
                                      "all (default: `split` unless train, else by training or evaluation)")
    label: str = option("group", "emoji classification labels: group (9) or subgroup (99)")
    skin_tones: bool = option(False, "emoji: keep the skin-tone variants if the data has them")
    mode: str | None = option(None, "wordnet: mlm or classification (default: from the task type)")
    with_lemma: bool = option(True, "wordnet: the text is 'lemma: gloss' instead of the gloss alone")
    template: str = option(DEMO_TEXT_TEMPLATE, "wordnet classification prompt with `{s1}` and one `<|spe|>`")


def demo_image_transform(size: int):
    """uint8 PIL image -> float [3, size, size]: bicubic resize, ImageNet mean/std."""
    return T.Compose([
        T.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _subset(source: str, source_cfg: DataSourceConfig, training: bool) -> str:
    subset = read_options(DemoOptions, source_cfg).subset
    if subset is None and source_cfg.split != "train":
        subset = source_cfg.split
    if subset is None:
        subset = "train" if training else _EVAL_SUBSET[source]
    if subset not in _SUBSETS[source]:
        raise ValueError(f"demo source {source!r}: subset {subset!r} is not one of {list(_SUBSETS[source])}")
    return subset


class DemoImageDataset(BaseDataset):
    """Emoji or Fashion-MNIST images held in memory (uint8)."""

    Options = DemoOptions

    def __init__(self, source_cfg: DataSourceConfig, task_type: str, training: bool, size: int,
                 data_root: str = "") -> None:
        self.source_name = read_options(DemoOptions, source_cfg).source
        subset = _subset(self.source_name, source_cfg, training)
        super().__init__(source_cfg, training, data_root, name=f"demo[{self.source_name}:{subset}]")
        opts = self.options
        self.task_type = task_type
        self.subset = subset
        self.size = size
        self.transform = demo_image_transform(size)
        root = self.root or None
        records: list[Record] = []
        if self.source_name == "emoji":
            data = load_emoji(root)
            self.label_kind = opts.label
            if self.label_kind not in ("group", "subgroup"):
                raise ValueError(f"demo emoji: options.label must be 'group' or 'subgroup', got {self.label_kind!r}")
            idx = emoji_subset_indices(data, subset, skin_tones=opts.skin_tones)
            self.images = data["images"]
            labels = data[self.label_kind]
            names = data["names"]
            self.class_names = demo_class_names("emoji", self.label_kind, root)
            for i in idx.tolist():
                records.append(Record({"row": i, "label": int(labels[i]), "caption": str(names[i])}))
        else:
            data = load_fashion_mnist(root)
            self.label_kind = "class"
            self.images = data[f"{subset}_images"]
            labels = data[f"{subset}_labels"]
            self.class_names = demo_class_names("fashion_mnist", None, root)
            for i in range(len(labels)):
                records.append(Record({"row": i, "label": int(labels[i])}))
        self._finish(records)
        self.check_num_classes(len(self.class_names), f"the {self.source_name} class names")

    def labels(self) -> list[int]:
        return [r.data["label"] for r in self.records]

    def captions(self) -> list[str]:
        """Every sample's caption (emoji names), in dataset order."""
        return [r.data["caption"] for r in self.records]

    def image(self, row: int):
        arr = np.asarray(self.images[row])
        img = Image.fromarray(arr)
        return self.transform(img.convert("RGB") if arr.ndim == 2 else img)

    def load(self, record: Record, index: int) -> dict[str, Any]:
        d = record.data
        sample: dict[str, Any] = {"image": self.image(d["row"]), "id": d["row"]}
        if task_spec(self.task_type).class_labels:
            sample["label"] = d["label"]
        elif self.training:
            sample["caption"] = d["caption"]
        else:
            sample["captions"] = [d["caption"]]
        return sample


class DemoTextDataset(BaseDataset):
    """WordNet noun glosses: an MLM corpus or gloss -> lexname classification."""

    Options = DemoOptions

    def __init__(self, source_cfg: DataSourceConfig, tokenizer: ClipTokenizer, training: bool, *, mode: str,
                 max_len: int, probability: float = 0.15, data_root: str = "") -> None:
        subset = _subset("wordnet", source_cfg, training)
        super().__init__(source_cfg, training, data_root, name=f"demo[wordnet:{subset}:{mode}]")
        if mode not in ("mlm", "classification"):
            raise ValueError(f"demo wordnet: options.mode must be 'mlm' or 'classification', got {mode!r}")
        if tokenizer is None:
            raise ValueError("demo wordnet needs a tokenizer")
        opts = self.options
        self.subset = subset
        self.mode = mode
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.probability = probability
        self.template = opts.template
        if mode == "classification" and ("{s1}" not in self.template or "<|spe|>" not in self.template):
            raise ValueError(f"demo wordnet: template {self.template!r} needs {{s1}} and <|spe|>")
        with_lemma = opts.with_lemma
        root = self.root or None
        rows = load_wordnet(root)
        self.class_names = demo_class_names("wordnet", None, root)
        records = [Record({"row": i, "label": rows.labels[i], "text": rows.text(i, with_lemma)})
                   for i in wordnet_subset_indices(rows, subset)]
        self._finish(records)
        self.check_num_classes(len(self.class_names), "the WordNet lexname names")

    def labels(self) -> list[int] | None:
        return [r.data["label"] for r in self.records] if self.mode == "classification" else None

    def load(self, record: Record, index: int) -> dict[str, Any]:
        d = record.data
        if self.mode == "classification":
            ids, spe_index = build_prompt(self.tokenizer, self.template, [d["text"]], self.max_len)
            return {"ids": ids, "spe_index": spe_index, "label": d["label"], "id": d["row"]}
        words = split_words(self.tokenizer, d["text"]) + [[self.tokenizer.EOT]]
        ids, labels = mask_words(words, self.probability, len(self.tokenizer))
        return {"ids": truncate_keep_last(ids, self.max_len), "mlm_labels": truncate_keep_last(labels, self.max_len),
                "id": d["row"]}


def build_demo_dataset(task: TaskConfig, source_cfg: DataSourceConfig, split: str,
                       tokenizer: ClipTokenizer | None = None, model_cfg: ModelConfig | None = None,
                       data_root: str = "") -> BaseDataset:
    """The demo dataset of one task: `split` 'train' = training (index with `(index, seed)`),
    anything else = evaluation. See the module docstring for the options."""
    opts = read_options(DemoOptions, source_cfg, where=f"task {task.name!r}")
    source = opts.source
    if source not in DEMO_SOURCES:
        raise ValueError(f"task {task.name}: options.source must be one of {list(DEMO_SOURCES)}, got {source!r}")
    if task.type not in DEMO_SOURCES[source]:
        raise ValueError(f"task {task.name}: demo source {source!r} feeds {list(DEMO_SOURCES[source])}, "
                         f"not {task.type}")
    training = split == "train"
    try:
        if source == "wordnet":
            default_mode = "mlm" if task.type == "text_mlm" else "classification"
            mode = opts.mode or default_mode
            if mode != default_mode:
                raise ValueError(f"task {task.name}: options.mode {mode!r} does not fit task type {task.type}")
            return DemoTextDataset(source_cfg, tokenizer, training, mode=mode, max_len=task.max_text_len,
                                   probability=task.mlm_probability, data_root=data_root)
        return DemoImageDataset(source_cfg, task.type, training, input_size(task, model_cfg), data_root=data_root)
    except FileNotFoundError as exc:
        raise DataError(f"task {task.name}: {exc}") from exc
