"""CLIP byte-level BPE tokenizer used by Uni-Perceiver-MoE."""

from .clip_tokenizer import ClipTokenizer, pad_ids

__all__ = ["ClipTokenizer", "pad_ids"]
