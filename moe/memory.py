"""Large gradient buffers backed by transparent huge pages (Linux CPU).

An expert gradient is E times a dense layer's (8 x 3072 x 768 fp32 = 75 MB). glibc serves
blocks above its mmap threshold (at most 32 MB) with fresh mmap'd pages on every call, so such a
buffer page-faults 4 KiB at a time on every backward pass (~40 ms per 75 MB on one core), while a
dense layer's 9 MB gradient is recycled warm from the heap. Backing the buffer with 2 MiB huge
pages (madvise(MADV_HUGEPAGE), honoured when THP is "always" or "madvise") makes those faults
~500x rarer. The tensor owns the mapping; it is unmapped when the tensor is freed.

Set MOE_HUGEPAGE_GRADS=0 to use plain torch.empty everywhere.
"""
from __future__ import annotations

import mmap
import os

import torch
from torch import Tensor

HUGEPAGE_MIN_BYTES = 32 << 20  # below glibc's largest mmap threshold, buffers are recycled warm
_HUGE = 2 << 20


def empty_like_large(t: Tensor, zero: bool = False) -> Tensor:
    """torch.empty_like(t) (torch.zeros_like when `zero`), backed by huge pages when it is a
    large CPU buffer on Linux.

    Fresh anonymous pages read as zeros, so a zeroed huge-page buffer costs no writes: rows
    that are never written (experts that got no tokens, or were not chosen by a merged
    segment) are never touched at all.
    """
    nbytes = t.numel() * t.element_size()
    if (
        t.device.type != "cpu"
        or nbytes < HUGEPAGE_MIN_BYTES
        or not hasattr(mmap, "MADV_HUGEPAGE")
        or os.environ.get("MOE_HUGEPAGE_GRADS", "1") == "0"
    ):
        make = torch.zeros_like if zero else torch.empty_like
        return make(t, memory_format=torch.contiguous_format)
    size = -(-nbytes // _HUGE) * _HUGE
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    flat = torch.frombuffer(buf, dtype=t.dtype, count=t.numel())  # keeps `buf` alive
    return flat.view(t.shape)
