"""Readers of the task data in the original layouts (OFFICIAL.md 4.2); `datasets.demo` holds the
embedded offline demo. Every reader returns sample dicts (see `uniperceiver.data`)."""
from .base import BaseDataset, NoOptions, Record
from .captions import CocoKarpathyDataset, CocoKarpathyOptions, Flickr30kDataset
from .glue import GLUE_PROMPTS, GlueDataset, GlueOptions
from .imagenet import ImageNet22kDataset, ImageNetDataset
from .jsonl import JsonlDataset, JsonlOptions
from .kinetics import KineticsDataset, KineticsOptions, load_video_views
from .mlm_corpus import MLMCorpusDataset, MLMCorpusOptions
from .msvd import MsvdDataset, MsvdOptions

__all__ = [
    "GLUE_PROMPTS",
    "BaseDataset",
    "CocoKarpathyDataset",
    "CocoKarpathyOptions",
    "Flickr30kDataset",
    "GlueDataset",
    "GlueOptions",
    "ImageNet22kDataset",
    "ImageNetDataset",
    "JsonlDataset",
    "JsonlOptions",
    "KineticsDataset",
    "KineticsOptions",
    "MLMCorpusDataset",
    "MLMCorpusOptions",
    "MsvdDataset",
    "MsvdOptions",
    "NoOptions",
    "Record",
    "load_video_views",
]
