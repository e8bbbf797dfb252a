"""Real FSDP runs on CPU (2 gloo ranks under torchrun, ranks on different tasks every step):
10 steps equal the DDP run; kill -9 of the whole job after a distributed checkpoint, then a
rerun, ends bit-identical to the uninterrupted run; the checkpoint resumes on another world size
and trains on; it consolidates to the single-file model and evaluates to the same metrics."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine_utils import REPO, read_metrics, run_train, with_eval_data, write_tiny_run
from uniperceiver.engine import dcp

ROUND_ROBIN = "train.sampling=round_robin"  # two tasks on two ranks: both ranks differ every step


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 10 steps with DDP and with FSDP (checkpoints at 5 and 10)."""
    out = {}
    for name, extra in (("ddp", []), ("fsdp", ["train.fsdp=true"])):
        folder = tmp_path_factory.mktemp(name)
        cfg = with_eval_data(write_tiny_run(folder, max_steps=10, checkpoint_every=5))
        res = run_train([str(cfg), ROUND_ROBIN, *extra], nproc=2, timeout=400)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        out[name] = (cfg, folder / "out")
    return out


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own, so a
    process-group kill would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _model(path):
    if path.is_dir():
        return dcp.consolidate_model_state(path)[0]
    return torch.load(path, weights_only=False)["model"]


def test_fsdp_ten_steps_equal_ddp(runs):
    ddp = _model(runs["ddp"][1] / "checkpoints" / "step_00000010.pt")
    fsdp_dir = runs["fsdp"][1] / "checkpoints" / "step_00000010"
    assert dcp.is_dcp_checkpoint(fsdp_dir)
    fsdp = _model(fsdp_dir)
    assert ddp.keys() == fsdp.keys()
    for k in ddp:
        ref = ddp[k].float()
        rel = (fsdp[k].float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
        assert rel <= 1e-4, (k, float(rel))
    rows = read_metrics(runs["fsdp"][1])
    assert len(rows) == 10 and all(len(r["loss"]) == 2 for r in rows)  # each step: both tasks


def test_kill9_of_the_whole_job_then_rerun_is_bit_exact(runs, tmp_path):
    cfg = with_eval_data(write_tiny_run(tmp_path, max_steps=10, checkpoint_every=5))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "uniperceiver.train", str(cfg), ROUND_ROBIN, "train.fsdp=true"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "out" / "checkpoints" / "step_00000005"
    deadline = time.time() + 300
    try:
        while not dcp.is_dcp_checkpoint(first) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        for pid in [proc.pid, *_descendants(proc.pid)]:  # the launcher and both ranks
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(30)
    assert dcp.is_dcp_checkpoint(first)
    assert not dcp.is_dcp_checkpoint(tmp_path / "out" / "checkpoints" / "step_00000010")
    resumed = run_train([str(cfg), ROUND_ROBIN, "train.fsdp=true"], nproc=2, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000005" in resumed.stdout

    a = _model(runs["fsdp"][1] / "checkpoints" / "step_00000010")
    b = _model(tmp_path / "out" / "checkpoints" / "step_00000010")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref_losses = {r["step"]: r["loss"] for r in read_metrics(runs["fsdp"][1])}
    cut_losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "out")}
    for step in range(6, 11):
        assert ref_losses[step] == cut_losses[step], step


def test_sharded_checkpoint_resumes_on_one_process_and_trains_on(runs, tmp_path):
    from uniperceiver.config import RunConfig, load_config
    from uniperceiver.engine import Trainer

    src_cfg, src_out = runs["fsdp"]
    shutil.copytree(src_out / "checkpoints" / "step_00000005", tmp_path / "out" / "checkpoints" / "step_00000005")
    cfg = load_config(RunConfig, str(src_cfg), [f"train.output_dir={tmp_path / 'out'}", "train.max_steps=7",
                                                "train.checkpoint_every=7"])
    trainer = Trainer(cfg)  # 1 process, no FSDP: a replicated run
    assert trainer.resume() and trainer.step == 5
    full = dcp.consolidate_model_state(src_out / "checkpoints" / "step_00000005")[0]
    own = trainer.model.state_dict()
    assert own.keys() == full.keys()
    for k in full:
        assert torch.equal(own[k], full[k]), k
    # The optimizer's moments came along (resharded from 2 FSDP ranks to one whole tensor).
    assert all(s["exp_avg"].shape == p.shape for p, s in trainer.optimizer.state.items())
    result = trainer.train()
    assert result["step"] == 7
    assert (tmp_path / "out" / "checkpoints" / "step_00000007.pt").is_file()  # replicated: one file


def test_consolidated_checkpoint_loads_and_evaluates_like_the_sharded_one(runs, tmp_path):
    from uniperceiver import eval as eval_cli
    from uniperceiver.modeling.model import UniPerceiver

    cfg, out = runs["fsdp"]
    sharded = out / "checkpoints" / "step_00000010"
    single = tmp_path / "model.pt"
    res = subprocess.run([sys.executable, "-m", "uniperceiver.convert", "--consolidate", str(sharded), str(single)],
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    model = UniPerceiver.from_pretrained(single)
    full = _model(sharded)
    for k, v in model.state_dict().items():
        assert torch.equal(v, full[k]), k
    metrics = {}
    for name, ckpt in (("sharded", sharded), ("single", single)):
        rc = eval_cli.main([str(cfg), f"eval.checkpoint={ckpt}", f"eval.output_json={tmp_path / name}.json"])
        assert rc == 0
        metrics[name] = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]
    assert metrics["sharded"] == metrics["single"] and metrics["single"]["cls"]


def test_torchrun_tiny_cpu_with_fsdp(tmp_path):
    res = run_train([str(REPO / "configs/debug/tiny_cpu.yaml"), "train.fsdp=true", "train.max_steps=2",
                     "train.checkpoint_every=2", f"train.output_dir={tmp_path / 'out'}", "train.tensorboard=false"],
                    nproc=2, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert dcp.is_dcp_checkpoint(tmp_path / "out" / "checkpoints" / "step_00000002")


def test_checkpoint_of_another_model_fails_clearly(runs, tmp_path):
    from uniperceiver.config import ConfigError, RunConfig, load_config
    from uniperceiver.engine import Trainer

    src_cfg, src_out = runs["fsdp"]
    shutil.copytree(src_out / "checkpoints" / "step_00000005", tmp_path / "out" / "checkpoints" / "step_00000005")
    cfg = load_config(RunConfig, str(src_cfg), [f"train.output_dir={tmp_path / 'out'}", "model.d_ffn=96"])
    trainer = Trainer(cfg)
    with pytest.raises(ConfigError, match=r"step_00000005 does not match this run's model: wrong shape \(\d+\): "
                                          r"encoder\.layers\.\d\.fc1"):  # a ConfigError: the CLI exits 2
        trainer.resume()
