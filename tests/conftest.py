"""Test markers. CPU by default: `gpu` tests skip without CUDA; `world_size(n)` tests spawn their
own n gloo processes (tests/dist_utils.py), so plain `pytest` runs them on a laptop."""
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running test")
    config.addinivalue_line("markers", "world_size(n): spawns n gloo processes")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
