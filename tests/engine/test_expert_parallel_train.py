"""Expert parallelism in the trainer: ranks on different tasks every step (round robin), the
experts split over the ranks; after 10 steps the weights equal the replicated (EP = 1) run with
the same seed and data (on 4 ranks also with FSDP, token router), and the checkpoint resumes into
the sharded model."""
import pytest
import torch
from engine_utils import write_tiny_run
from dist_utils import run_distributed

from uniperceiver.config import RunConfig, load_config
from uniperceiver.engine import Trainer
from uniperceiver.engine.parallelize import full_model_state_dict


def _run(cfg_path, out, ep, router, steps=10, extra=()):
    overrides = [*extra, f"train.output_dir={out}", f"train.expert_parallel_size={ep}", "train.sampling=round_robin",
                 f"model.moe.routing.router={router}", f"train.max_steps={steps}", "train.checkpoint_every=100",
                 "train.log_every=100"]
    if router == "token":
        # Dropless: with a capacity, EP agrees one budget over the group (the replicated run
        # budgets per rank), so drops, and hence weights, would differ by design.
        overrides.append("model.moe.routing.dropless=true")
    trainer = Trainer(load_config(RunConfig, str(cfg_path), overrides))
    trainer.train()
    return trainer


def _worker(rank, world, cfg_path, root, router, with_fsdp=False):
    ref = _run(cfg_path, f"{root}/ep1", 1, router).model.state_dict()
    trainer = _run(cfg_path, f"{root}/ep{world}", world, router)
    assert trainer.mesh is not None and trainer.mesh["ep"].size() == world
    local = dict(trainer.model.named_parameters())["encoder.layers.0.qkv.weight_EOI"].to_local()
    assert local.shape[0] == 8 // world  # this rank keeps E / ep experts
    got = full_model_state_dict(trainer.model)
    assert got.keys() == ref.keys()
    for name, want in ref.items():
        err = float((got[name] - want).abs().max() / want.abs().max().clamp_min(1e-12))
        assert err <= 1e-4, f"rank {rank} {router}: {name}: max|diff|/max|ref| = {err:.2e}"
    # The step-10 checkpoint resumes into a sharded model (nothing left to train).
    resumed = _run(cfg_path, f"{root}/ep{world}", world, router)
    assert resumed.step == 10
    again = full_model_state_dict(resumed.model)
    for name in got:
        assert torch.equal(again[name], got[name]), name
    if with_fsdp:  # EP = world size composed with FSDP: the same weights
        composed = _run(cfg_path, f"{root}/ep{world}_fsdp", world, router, extra=["train.fsdp=true"])
        assert composed.fsdp_root is not None and composed.mesh["ep"].size() == world
        got = full_model_state_dict(composed.model)
        for name, want in ref.items():
            err = float((got[name] - want).abs().max() / want.abs().max().clamp_min(1e-12))
            assert err <= 1e-4, f"rank {rank} {router} + FSDP: {name}: max|diff|/max|ref| = {err:.2e}"


@pytest.mark.world_size(2)
@pytest.mark.parametrize("router", ["attribute", "token"])
def test_ep2_equals_replicated_after_10_steps(tmp_path, router):
    cfg = write_tiny_run(tmp_path)
    run_distributed(_worker, world_size=2, args=(cfg, str(tmp_path), router), timeout_s=420)


@pytest.mark.world_size(4)
@pytest.mark.parametrize("router", ["attribute", "token"])
def test_ep4_equals_replicated_after_10_steps(tmp_path, router):
    """The token router's run also composes EP = 4 with FSDP (EP = 2 + FSDP: test_ep_fsdp_runs.py)."""
    cfg = write_tiny_run(tmp_path)
    run_distributed(_worker, world_size=4, args=(cfg, str(tmp_path), router, router == "token"), timeout_s=540)
