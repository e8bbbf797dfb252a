"""benchmarks/expert_throughput.py: the preset grid, a tiny end-to-end run, and expert parallelism
under torchrun. Timings are not asserted (performance lives in the benchmark's results, never in
tests); what is checked is that every row is measured, recorded with its fields, and that a peer
which cannot run is recorded as skipped instead of stopping the run."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import free_port
from moe.kernels import use_onednn

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "expert_throughput.py"
TINY = ["--d-model", "16", "--d-ff", "32", "--tokens", "128", "--experts", "4", "--threads", "1",
        "--repeats", "3", "--warmup", "1"]


def _harness():
    spec = importlib.util.spec_from_file_location("expert_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(cmd: list[str], tmp_path: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_preset_grid_has_every_required_row_and_groups_peers_with_ours():
    h = _harness()
    cases, preset = h.preset_cases("cpu-reference", ["torch"], True, 1)
    assert (preset["d_model"], preset["d_ff"], preset["experts"], preset["tokens"], preset["dtype"]) == (
        768, 3072, 8, 4096, "float32")
    ours = {(c.router, c.top_k, c.capacity_factor) for c in cases if c.impl == "ours"}
    assert {r for r, _, _ in ours} == {"attribute", "task", "modality", "token"}
    assert {(k, cf) for r, k, cf in ours if r == "token"} == {
        (k, cf) for k in (1, 2) for cf in (1.0, 1.25, None)}
    groups = h.group_cases(cases)
    for group in groups:  # one top-k per group (its capacity factors, ours and the peers)
        assert len({c.top_k for c in group if c.router == "token"}) <= 1
    top1_cf1 = next(g for g in groups if any(c.impl == "deepspeed" and c.top_k == 1 and c.capacity_factor == 1.0
                                             for c in g))
    assert {c.impl for c in top1_cf1} == {"ours", "deepspeed", "tutel"} and len(top1_cf1) == 7
    assert [c.impl for c in groups[-1]] == ["fairscale"]


def test_tiny_grid_with_peers_writes_one_complete_row_per_case(tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = _run([sys.executable, str(SCRIPT), "--router", "token", "attribute", "--top-k", "1", "2",
                 "--capacity-factor", "1.0", "dropless", "--routing", "uniform", "--peers", "--cold-heap", *TINY,
                 "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out)
    # ours: token x {k1, k2} x {1.0, dropless} + attribute x {k1, k2}; peers: 2 x {deepspeed, tutel} + fairscale
    assert len(rows) == 6 + 5
    for row in rows:
        for key in ("router", "backend", "top_k", "capacity_factor", "machine", "git_commit", "timestamp"):
            assert key in row
        if row["impl"] == "ours":
            assert row["status"] == "ok", row["status"]
        else:
            assert row["status"] == "ok" or row["status"].startswith("skipped: "), row["status"]
        if row["status"] == "ok":
            assert row["ratio_to_k_dense"] > 0 and len(row["ms_all"]) == row["repeats"] == 3
            assert row["tokens_per_s"] > 0
    dropless = [r for r in rows if r["impl"] == "ours" and r["router"] == "token" and r["capacity_factor"] is None]
    assert len(dropless) == 2 and all(r["drop_rate"] == 0.0 for r in dropless)
    peers_ok = [r for r in rows if r["impl"] in ("deepspeed", "tutel") and r["status"] == "ok"]
    assert all(r["paired_ratio_to_ours"] > 0 for r in peers_ok)
    # fp32 on CPU: a second dense FFN on our matmul kernels (oneDNN) is timed in groups with our layer
    ours = [r for r in rows if r["impl"] == "ours"]
    if use_onednn(torch.empty(0)):
        assert all(r["ratio_to_k_dense_moe_kernels"] > 0 and r["dense_moe_kernels_ms_median"] > 0 for r in ours)
        assert "/kern" in proc.stdout
    fairscale = [r for r in rows if r["impl"] == "fairscale" and r["status"] == "ok"]
    assert all(r["ratio_to_k_dense_moe_kernels"] is None for r in fairscale)  # no layer of ours in its group
    assert "ratio" in proc.stdout and "rows in" in proc.stdout


@pytest.mark.world_size(2)
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_expert_parallel_run_under_torchrun(tmp_path):
    out = tmp_path / "ep.jsonl"
    proc = _run(["torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()), str(SCRIPT), "--router", "token",
                 "attribute", "--top-k", "2", "--capacity-factor", "1.0", "dropless", "--ep", *TINY,
                 "--out", str(out)], tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out)  # written by rank 0 only
    assert len(rows) == 3 and all(r["status"] == "ok" and r["ep_size"] == 2 and r["world_size"] == 2 for r in rows)
