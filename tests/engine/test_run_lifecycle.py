"""A run never loses or corrupts work: rotation that never counts unreadable files, one trainer
per output directory, resume that applies (or refuses) changed settings, fp16 non-finite limits,
a stopped peer ending the job."""
import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from engine_utils import REPO, read_metrics, run_train, write_tiny_run

from uniperceiver.engine.checkpoint import (list_checkpoints, load_latest_checkpoint, prepare_checkpoint_dir,
                                            save_checkpoint)
from uniperceiver.engine.lock import OutputDirLock, OutputDirLockedError


def _state(step):
    return {"model": {"w": torch.tensor(float(step))}, "optimizer": {}, "step": step}


@pytest.mark.parametrize("keep_last", [1, 2])
@pytest.mark.parametrize("damage", ["junk", "truncated"])
def test_rotation_never_counts_or_deletes_unreadable_files(tmp_path, caplog, keep_last, damage):
    for step in (1, 2):
        save_checkpoint(_state(step), tmp_path, step, keep_last)
    folder = tmp_path / "checkpoints"
    bad = folder / "step_00000099.pt"  # a higher step than anything this run will write
    good = (folder / "step_00000002.pt").read_bytes()
    bad.write_bytes(b"not a checkpoint" * 10 if damage == "junk" else good[: len(good) // 2])

    save_checkpoint(_state(3), tmp_path, 3, keep_last)
    save_checkpoint(_state(4), tmp_path, 4, keep_last)
    steps = [s for s, _ in list_checkpoints(tmp_path)]
    assert steps == [3, 4][-keep_last:]  # the last saved step survives, the damaged file is not counted
    state, path = load_latest_checkpoint(tmp_path)
    assert state["step"] == 4
    assert not bad.exists() and (folder / "corrupt" / bad.name).exists()  # set aside, never deleted
    assert "unreadable" in caplog.text and "corrupt" in caplog.text


def test_damaged_newest_at_start_is_set_aside_and_resume_uses_the_previous(tmp_path):
    for step in (1, 2):
        save_checkpoint(_state(step), tmp_path, step, keep_last=2)
    newest = tmp_path / "checkpoints" / "step_00000002.pt"
    newest.write_bytes(newest.read_bytes()[:200])
    orphan = tmp_path / "checkpoints" / ".step_00000003.pt.1a2b3c4d.tmp"  # a save killed mid-write
    orphan.write_bytes(b"partial")
    prepare_checkpoint_dir(tmp_path)
    assert not orphan.exists()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert (tmp_path / "checkpoints" / "corrupt" / "step_00000002.pt").exists()
    assert load_latest_checkpoint(tmp_path)[0]["step"] == 1


def test_checkpoint_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(_state(1), tmp_path, 1, keep_last=1)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


_HOLD = "import sys, time; from uniperceiver.engine.lock import OutputDirLock; lock = OutputDirLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(60)"


def test_lock_names_the_holder_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirLockedError, match=rf"{tmp_path} is in use by another run \(host \S+ pid {holder.pid} "):
            OutputDirLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with OutputDirLock(tmp_path) as lock:  # the kernel dropped the dead holder's lock
        assert lock.held
        with pytest.raises(OutputDirLockedError, match=f"pid {os.getpid()} "):
            OutputDirLock(tmp_path).acquire()
    OutputDirLock(tmp_path).acquire()  # released on exit of the with-block


def test_second_trainer_on_a_live_directory_exits_2_and_the_first_is_untouched(tmp_path):
    cfg = write_tiny_run(tmp_path, max_steps=1000, checkpoint_every=4)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "uniperceiver.train", str(cfg)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = tmp_path / "out" / "metrics.jsonl"
        deadline = time.time() + 180
        while (not metrics.exists() or metrics.stat().st_size == 0) and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        second = run_train([str(cfg), "seed=7"], timeout=120)
        assert first.poll() is None  # still training while the second one was refused
    finally:
        first.send_signal(signal.SIGUSR1)  # the first saves and stops
        out, _ = first.communicate(timeout=240)
    assert second.returncode == 2, second.stdout + second.stderr
    message = second.stderr.strip().splitlines()
    assert len(message) == 1 and str(tmp_path / "out") in message[0] and f"pid {first.pid} " in message[0], message
    assert first.returncode == 0 and "stopping on signal" in out, out
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["seed"] == 0
    last = read_metrics(tmp_path / "out")[-1]["step"]
    assert [r["step"] for r in read_metrics(tmp_path / "out")] == list(range(1, last + 1))  # one writer
    steps = [s for s, _ in list_checkpoints(tmp_path / "out")]
    assert steps[-1] == last
    final = torch.load(tmp_path / "out" / "checkpoints" / f"step_{last:08d}.pt", weights_only=False)
    assert final["config"]["seed"] == 0


def test_resume_applies_a_new_lr_and_refuses_a_new_model_width(tmp_path, caplog):
    from uniperceiver.config import RunConfig, load_config
    from uniperceiver.engine import Trainer, lr_factor

    cfg_path = write_tiny_run(tmp_path, max_steps=3, checkpoint_every=3)
    assert Trainer(load_config(RunConfig, str(cfg_path))).train()["step"] == 3
    caplog.set_level("INFO")
    new = load_config(RunConfig, str(cfg_path), ["train.max_steps=5", "train.optim.lr=2e-2",
                                                  "train.optim.weight_decay=0.5"])
    Trainer(new).train()
    assert ("resumed at step 3; changed since the checkpoint: train.max_steps 3 -> 5, train.optim.lr 0.002 -> 0.02, "
            "train.optim.weight_decay 0.05 -> 0.5") in caplog.text
    state = torch.load(tmp_path / "out" / "checkpoints" / "step_00000005.pt", weights_only=False)
    groups = state["optimizer"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(2e-2 * lr_factor(5, new.train.optim, 5))
    assert groups[0]["weight_decay"] == 0.5 and groups[1]["weight_decay"] == 0.0
    assert state["config"]["train"]["optim"]["lr"] == 2e-2

    before = (tmp_path / "out" / "config.yaml").read_text()
    res = run_train([str(cfg_path), "train.max_steps=8", "model.d_model=96", "model.num_heads=2"])
    assert res.returncode == 2, res.stdout + res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot change mid-run" in err[0] and "model.d_model 64 -> 96" in err[0], err
    assert (tmp_path / "out" / "config.yaml").read_text() == before  # the record stays the truth
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [3, 5]


def test_fp16_with_a_huge_lr_stops_after_max_nonfinite(tmp_path):
    """The loss scaler's own backoffs (scale 8192 -> 1) do not count; skipped steps at the floor do.
    Runs the real fp16 GradScaler path on CPU (torch.amp.GradScaler('cpu') + CPU fp16 autocast)."""
    cfg = write_tiny_run(tmp_path, max_steps=60, checkpoint_every=1000)
    res = run_train([str(cfg), "train.amp=fp16", "train.optim.lr=1e6", "train.optim.warmup_steps=0",
                     "train.optim.clip_grad=null", "train.max_nonfinite=3"])
    assert res.returncode == 3, res.stdout[-3000:] + res.stderr[-3000:]
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "4 non-finite steps in a row with the fp16 loss scale at its floor" in err[0], err
    assert "fp16 overflow at loss scale 8192" in res.stdout  # early skips: backoffs, not counted
    assert not list((tmp_path / "out" / "checkpoints").glob("step_*.pt"))  # nothing poisoned was saved


def _spawn_rank(cfg, rank, port, env, *overrides):
    env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    return subprocess.Popen([sys.executable, "-m", "uniperceiver.train", str(cfg), *overrides],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def _two_ranks_past_their_first_step(tmp_path, *overrides):
    """Two trainer processes (gloo, one thread each) on a 400-step tiny run, yielded once the
    first step's metrics are written; whatever is still running at the end is killed."""
    from dist_utils import free_port

    cfg = write_tiny_run(tmp_path, max_steps=400, checkpoint_every=1000)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    port = free_port()
    ranks = [_spawn_rank(cfg, r, port, env, *overrides) for r in (0, 1)]
    try:
        metrics = tmp_path / "out" / "metrics.jsonl"
        deadline = time.time() + 180
        while (not metrics.exists() or metrics.stat().st_size == 0) and time.time() < deadline:
            assert all(p.poll() is None for p in ranks), [p.communicate() for p in ranks]
            time.sleep(0.05)
        yield ranks
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
            p.communicate()


def test_a_stopped_peer_ends_the_job_within_the_collective_timeout(tmp_path):
    with _two_ranks_past_their_first_step(tmp_path, "train.collective_timeout_s=10") as ranks:
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = ranks[0].communicate(timeout=10 + 40)
        took = time.monotonic() - stopped
        assert ranks[0].returncode not in (0, None)
        assert took < 10 + 30, took
        assert "collective '" in err and "at step" in err and "collective_timeout_s=10" in err, err[-2000:]


@pytest.mark.parametrize("sharding", [
    ["train.expert_parallel_size=2", "model.moe.routing.router=token"],  # tokens to the experts' owners
    ["train.expert_parallel_size=2", "model.moe.routing.router=attribute", "train.fsdp=true"],  # experts moved
], ids=["ep2-token", "ep2-attribute-fsdp"])
def test_a_rank_killed_under_expert_parallelism_ends_the_other_in_bounded_time(tmp_path, sharding):
    """kill -9 of one rank of a sharded run (each rank on another task): the survivor fails its
    next collective (the peer's sockets closed, or train.collective_timeout_s) and exits 3 with
    one line naming the collective; it never hangs and writes no checkpoint."""
    with _two_ranks_past_their_first_step(tmp_path, "train.collective_timeout_s=10", "train.sampling=round_robin",
                                          *sharding) as ranks:
        ranks[1].kill()  # SIGKILL: no handler, no goodbye
        killed = time.monotonic()
        _, err = ranks[0].communicate(timeout=10 + 40)
        took = time.monotonic() - killed
        assert ranks[0].returncode == 3, (ranks[0].returncode, err[-2000:])
        assert took < 10 + 30, took
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "collective '" in lines[0] and "collective_timeout_s=10" in lines[0], err[-2000:]
        assert not list((tmp_path / "out" / "checkpoints").glob("step_*"))


def test_sigterm_while_blocked_in_a_collective_still_ends_the_worker(tmp_path):
    """The peer is stopped, so the stop-flag all_reduce never completes: the signal's grace period
    (train.stop_grace_s) ends the process long before the collective timeout would."""
    with _two_ranks_past_their_first_step(tmp_path, "train.collective_timeout_s=300", "train.stop_grace_s=3") as ranks:
        ranks[1].send_signal(signal.SIGSTOP)
        time.sleep(1.0)
        ranks[0].send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = ranks[0].communicate(timeout=60)
        assert time.monotonic() - sent < 3 + 20
        assert ranks[0].returncode == 128 + signal.SIGTERM, err[-2000:]
        assert "after SIGTERM (train.stop_grace_s=3" in err and "exiting without a checkpoint" in err, err[-2000:]


_SECOND_SIGNAL = """
import os, signal, time
from uniperceiver.engine.watchdog import Watchdog
stops = []
dog = Watchdog(collective_timeout_s=600, stop_grace_s=30, on_stop=stops.append)
dog.start()
print("ready", flush=True)
with dog.phase("all_reduce", 7):
    time.sleep(60)
"""


def test_a_second_signal_exits_at_once():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _SECOND_SIGNAL], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGUSR1)
    time.sleep(1.0)
    assert proc.poll() is None  # the first one asks for a stop and waits for the step to end
    proc.send_signal(signal.SIGUSR1)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=20)
    assert time.monotonic() - sent < 5
    assert proc.returncode == 128 + signal.SIGUSR1
    assert "second stop signal (SIGUSR1): exiting at once (collective 'all_reduce' at step 7" in err, err
