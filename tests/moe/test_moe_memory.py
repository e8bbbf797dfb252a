"""Huge-page gradient buffers: zeroed when asked, usable as ordinary tensors, off by env."""
import torch

from moe.memory import HUGEPAGE_MIN_BYTES, empty_like_large


def test_large_zeroed_buffer_reads_zero_and_is_writable():
    like = torch.empty(HUGEPAGE_MIN_BYTES // 4 + 7)
    buf = empty_like_large(like, zero=True)
    assert buf.shape == like.shape and buf.is_contiguous()
    assert torch.count_nonzero(buf) == 0
    buf[::1000] = 1.0
    assert float(buf.sum()) == len(range(0, buf.numel(), 1000))


def test_small_and_disabled_fall_back_to_torch(monkeypatch):
    assert torch.count_nonzero(empty_like_large(torch.ones(3, 4), zero=True)) == 0
    monkeypatch.setenv("MOE_HUGEPAGE_GRADS", "0")
    assert torch.count_nonzero(empty_like_large(torch.ones(HUGEPAGE_MIN_BYTES // 4), zero=True)) == 0
