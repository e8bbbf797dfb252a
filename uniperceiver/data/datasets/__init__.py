"""Readers of the task data in the original layouts (OFFICIAL.md 4.2); `datasets.demo` holds the
embedded offline demo. Every reader returns sample dicts (see `uniperceiver.data`)."""
from .base import BaseDataset, Record
from .captions import CocoKarpathyDataset, Flickr30kDataset
from .glue import GLUE_PROMPTS, GlueDataset
from .imagenet import ImageNet22kDataset, ImageNetDataset
from .jsonl import JsonlDataset
from .kinetics import KineticsDataset, load_video_views
from .mlm_corpus import MLMCorpusDataset
from .msvd import MsvdDataset

__all__ = [
    "GLUE_PROMPTS",
    "BaseDataset",
    "CocoKarpathyDataset",
    "Flickr30kDataset",
    "GlueDataset",
    "ImageNet22kDataset",
    "ImageNetDataset",
    "JsonlDataset",
    "KineticsDataset",
    "MLMCorpusDataset",
    "MsvdDataset",
    "Record",
    "load_video_views",
]
