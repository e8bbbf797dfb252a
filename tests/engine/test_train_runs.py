"""Real training runs on CPU: resume after SIGKILL is bit-exact, 2 ranks with different tasks,
signals, non-finite losses, config errors."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine_utils import REPO, read_metrics, run_train, write_tiny_run


def _weights(out):
    state = torch.load(out / "checkpoints" / "step_00000006.pt", weights_only=False)
    return state["model"]


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    ref = write_tiny_run(tmp_path / "ref")
    done = run_train([str(ref)])
    assert done.returncode == 0, done.stdout + done.stderr

    cut = write_tiny_run(tmp_path / "cut")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "uniperceiver.train", str(cut)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "cut" / "out" / "checkpoints" / "step_00000003.pt"
    deadline = time.time() + 180
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (tmp_path / "cut" / "out" / "checkpoints" / "step_00000006.pt").exists()
    resumed = run_train([str(cut)])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout

    a, b = _weights(tmp_path / "ref" / "out"), _weights(tmp_path / "cut" / "out")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref_losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref" / "out")}
    cut_losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "cut" / "out")}
    for step in range(4, 7):
        assert ref_losses[step] == cut_losses[step], step


def test_two_ranks_train_different_tasks_without_hang(tmp_path):
    cfg = write_tiny_run(tmp_path, max_steps=30, checkpoint_every=30)
    res = run_train([str(cfg)], nproc=2, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = read_metrics(tmp_path / "out")
    assert len(rows) == 30
    assert any(len(r["loss"]) == 2 for r in rows)  # the ranks ran different tasks in one step
    cls = [r["loss"]["cls"] for r in rows if "cls" in r["loss"]]
    ret = [r["loss"]["ret"] for r in rows if "ret" in r["loss"]]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(cls[-10:]) < 0.8 * mean(cls[:5]) and mean(ret[-10:]) < 0.8 * mean(ret[:5]), (cls, ret)


def test_sigusr1_saves_and_exits(tmp_path):
    cfg = write_tiny_run(tmp_path, max_steps=500, checkpoint_every=500)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "uniperceiver.train", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 180
    while (not metrics.exists() or metrics.stat().st_size == 0) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    ckpts = list((tmp_path / "out" / "checkpoints").glob("step_*.pt"))
    assert len(ckpts) == 1 and "stopping on signal" in out
    step = int(ckpts[0].stem.split("_")[1])
    assert 0 < step < 500


def test_unknown_config_key_fails_before_training(tmp_path):
    cfg = write_tiny_run(tmp_path)
    res = run_train([str(cfg), "train.max_step=3"])
    assert res.returncode == 2
    assert "unknown config key 'train.max_step'" in res.stderr and "did you mean 'train.max_steps'" in res.stderr
    assert not (tmp_path / "out").exists()


def test_nonfinite_losses_are_skipped_then_abort(tmp_path, monkeypatch):
    from uniperceiver.config import RunConfig, load_config
    from uniperceiver.engine import NonFiniteLossError, Trainer
    from uniperceiver.engine import trainer as trainer_mod

    cfg = load_config(RunConfig, str(write_tiny_run(tmp_path, max_steps=20)), ["train.max_nonfinite=3"])
    calls = {"n": 0}
    real_forward = trainer_mod.TrainStep.forward

    def poisoned(self, batch, sets, sliced):
        loss, out = real_forward(self, batch, sets, sliced)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] >= 3 else loss), out

    monkeypatch.setattr(trainer_mod.TrainStep, "forward", poisoned)
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"4 non-finite steps in a row .*max_nonfinite=3"):
        trainer.train()
    assert trainer.nonfinite_total == 4
    # two finite steps (the first at lr 0 of the warmup) changed the weights; the skipped ones kept them finite
    after = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before)
