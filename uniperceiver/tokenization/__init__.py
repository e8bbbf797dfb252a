"""CLIP byte-level BPE tokenizer used by Uni-Perceiver-MoE."""

from .clip_tokenizer import ClipTokenizer

__all__ = ["ClipTokenizer"]
