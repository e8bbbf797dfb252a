"""benchmarks/train_step.py: the bookkeeping (paired ratios, the one-call and EP comparisons, bytes
handed to collectives) on a one-process gloo group. Timings are never asserted; the dry run
itself is CI's smoke (`python benchmarks/train_step.py --dry-run`)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dist_utils import free_port

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_step.py"


def _bench():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("train_step_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_rows_pair_each_case_with_the_same_repeat():
    b = _bench()
    dense = b.Case("dense", [], moe=False, times_ms=[100.0, 200.0, 100.0], tokens_per_step=1000)
    moe = b.Case("moe-attribute", [], moe=True, times_ms=[105.0, 220.0, 108.0], tokens_per_step=1000)
    sep = b.Case("moe-attribute/separate", [], moe=True, times_ms=[110.0, 230.0, 110.0], tokens_per_step=1000)
    dense.cpu_ms, moe.cpu_ms, sep.cpu_ms = [200.0, 200.0, 400.0], [220.0, 230.0, 400.0], [240.0, 240.0, 400.0]
    ep = b.Case("moe-attribute/ep2", [], moe=True, status="skipped: no EP")
    extra = {c.name: {"comm_bytes_per_step": 0, "comm_bytes_by_kind": {}, "peak_memory_bytes": 1} for c in (dense, moe, sep)}
    rows = {r["case"]: r for r in b.rows_for([dense, moe, sep, ep], {"extra": extra}, {"size": "x"})}
    assert rows["moe-attribute"]["ratio_to_dense"] == 1.08  # median of 1.05, 1.10, 1.08
    assert rows["moe-attribute"]["median_ms"] == 108.0 and rows["moe-attribute"]["tokens_per_s"] == round(1000 / 0.108, 1)
    assert rows["moe-attribute/separate"]["one_call_over_separate"] == round(sorted([105 / 110, 220 / 230, 108 / 110])[1], 4)
    # The same pairing on process CPU time: median of 1.10, 1.15, 1.00.
    assert rows["moe-attribute"]["cpu_ratio_to_dense"] == 1.1 and rows["moe-attribute"]["median_cpu_ms"] == 230.0
    assert rows["moe-attribute/separate"]["cpu_one_call_over_separate"] == round(sorted([220 / 240, 230 / 240, 1.0])[1], 4)
    assert rows["moe-attribute/ep2"]["status"].startswith("skipped") and "median_ms" not in rows["moe-attribute/ep2"]
    assert all(b.fmt(r) for r in rows.values())


def test_comm_counter_counts_what_this_rank_sends():
    b = _bench()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        counter = b.CommCounter()
        with counter.patched():
            counter.active = True
            dist.all_reduce(torch.zeros(10))  # 40 bytes
            out = torch.empty(6)
            dist.all_to_all_single(out, torch.zeros(6, dtype=torch.float32))  # 24 bytes
            dist.all_gather([torch.empty(3, dtype=torch.float64)], torch.zeros(3, dtype=torch.float64))  # 24
            counter.active = False
            dist.all_reduce(torch.zeros(100))  # not counted
        assert counter.bytes == {"all_reduce": 40, "all_to_all_single": 24, "all_gather": 24}
        assert dist.all_reduce is not None and "counted" not in dist.all_reduce.__qualname__  # restored
    finally:
        dist.destroy_process_group()


def test_ddp_buckets_are_counted_once():
    """DDP's comm hook calls dist.all_reduce, which the counter also wraps: one count per byte."""
    from types import SimpleNamespace

    from torch.nn.parallel import DistributedDataParallel as DDP

    b = _bench()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        counter = b.CommCounter()
        ddp = DDP(torch.nn.Linear(10, 10))  # 110 fp32 parameters: 440 bytes
        b.attach_ddp_counter(SimpleNamespace(ddp=ddp), counter)
        with counter.patched():
            counter.active = True
            ddp(torch.ones(2, 10)).sum().backward()
            counter.active = False
        assert counter.bytes == {"ddp_all_reduce": 440} and counter.total() == 440
    finally:
        dist.destroy_process_group()
