"""`benchmarks/gpu_suite.sh --dry-run`: the GPU suite's steps at toy sizes on the CPU, into a
temporary directory (the real run needs a GPU; see benchmarks/README.md)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_suite_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks/gpu_suite.sh"), "--dry-run", "--out-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {p.name.split("_")[0] + "_" + p.name.split("_")[1]: p for p in tmp_path.iterdir()}
    throughput = [json.loads(line) for line in open(files["expert_throughput"])]
    # the preset's rows, in fp32 and bf16: 3 merged routers + top-1/top-2 x (1.0, 1.25, dropless)
    assert sorted({r["dtype"] for r in throughput}) == ["bfloat16", "float32"]
    assert len([r for r in throughput if r["impl"] == "ours"]) == 2 * 9
    decoding = [json.loads(line) for line in open(files["caption_decoding"])]
    assert {(r["batch"], r["mode"]) for r in decoding} == {(b, m) for b in (1, 2) for m in ("cached", "reencode")}
    assert all(r["ids_match"] and r["static_step"] for r in decoding)
    steps = {r["case"]: r for r in map(json.loads, open(files["train_step"]))}
    assert {"dense", "moe-attribute", "moe-token"} <= set(steps)
    assert all(r["model_tflops_per_s"] > 0 and r["mfu"] is None for r in steps.values() if r["status"] == "ok")
    assert "gpu_suite: done" in files["gpu_suite"].read_text()


def test_gpu_suite_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(REPO / "benchmarks/gpu_suite.sh"), "--bogus"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "unknown argument '--bogus'" in proc.stderr
