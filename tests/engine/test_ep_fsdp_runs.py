"""Expert parallelism composed with FSDP, and its distributed checkpoints at other sizes (gloo
ranks, ranks on different tasks every step).

- EP = world size + FSDP: after 10 steps the weights equal the replicated DDP run of the same seed
  and data (attribute and token routers on 2 ranks; 4 ranks: test_expert_parallel_train.py);
- an EP = 2 + FSDP run resumed at the same size ends bit-identical to the uninterrupted one;
- an EP = 2 checkpoint resumes on 1 process, and on 4 (EP = 4, and EP = 2 x dp = 2 with FSDP);
  what those 4 ranks save resumes on 2 (4 -> 2): at the resume point the weights equal the
  checkpoint's consolidated weights exactly, the runs train on, and what they save consolidates
  to the weights they hold;
- the EP checkpoint evaluates to the same metrics as its consolidated file and as the replicated
  run's checkpoint;
- sizes that cannot divide are a config error (exit 2) naming train.expert_parallel_size;
- the torchrun command of launch/README.md (tiny_cpu, EP = 2, token router, round robin, FSDP).

The source runs are made once per module (`ep_runs`) and shared by the tests."""
import json
import shutil

import pytest
import torch

from dist_utils import run_distributed
from engine_utils import REPO, read_metrics, run_train, with_eval_data, write_tiny_run
from uniperceiver.config import ConfigError, RunConfig, load_config
from uniperceiver.engine import Trainer, dcp
from uniperceiver.engine.parallelize import full_model_state_dict

NUM_EXPERTS = 8  # configs/model/tiny_moe.yaml


def _overrides(out, router, extra=(), steps=10, every=5):
    o = [f"train.output_dir={out}", "train.sampling=round_robin", f"model.moe.routing.router={router}",
         f"train.max_steps={steps}", f"train.checkpoint_every={every}", "train.log_every=100", *extra]
    if router == "token":
        o.append("model.moe.routing.dropless=true")  # a capacity is budgeted per EP group by design
    return o


def _ep_fsdp(world):
    return [f"train.expert_parallel_size={world}", "train.fsdp=true"]


def _train_pair(rank, world, cfg_path, root, router):
    """The replicated DDP run and the EP = world + FSDP run, 10 steps each (checkpoints at 5, 10)."""
    Trainer(load_config(RunConfig, str(cfg_path), _overrides(f"{root}/ref", router))).train()
    sharded = Trainer(load_config(RunConfig, str(cfg_path), _overrides(f"{root}/sharded", router, _ep_fsdp(world))))
    assert sharded.fsdp_root is not None and sharded.mesh["ep"].size() == world
    local = dict(sharded.model.named_parameters())["encoder.layers.0.qkv.weight_EOI"].to_local()
    assert local.shape[0] == NUM_EXPERTS // world  # this rank keeps E / ep experts
    sharded.train()


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory):
    """get(router, world) -> (config path, folder holding ref/ and sharded/), made on first use."""
    made = {}

    def get(router, world):
        if (router, world) not in made:
            root = tmp_path_factory.mktemp(f"{router}_ep{world}")
            cfg = with_eval_data(write_tiny_run(root))
            run_distributed(_train_pair, world_size=world, args=(cfg, str(root), router), timeout_s=480)
            made[router, world] = (cfg, root)
        return made[router, world]

    return get


def _replicated(path):
    return torch.load(path, weights_only=False)["model"]


def _step(root, run, step):
    return root / run / "checkpoints" / f"step_{step:08d}"


@pytest.mark.world_size(2)
@pytest.mark.parametrize("router,world", [("attribute", 2), ("token", 2)])
def test_ep_with_fsdp_equals_replicated(ep_runs, router, world):
    _, root = ep_runs(router, world)
    want = _replicated(root / "ref" / "checkpoints" / "step_00000010.pt")
    path = _step(root, "sharded", 10)
    assert dcp.is_dcp_checkpoint(path)
    assert dcp.read_marker(path)["expert_parallel_size"] == world and dcp.read_marker(path)["fsdp"] is True
    got, _ = dcp.consolidate_model_state(path)
    assert got.keys() == want.keys()
    for name, w in want.items():
        err = float((got[name] - w).abs().max() / w.abs().max().clamp_min(1e-12))
        assert err <= 1e-4, f"{router} EP={world}: {name}: max|diff|/max|ref| = {err:.2e}"


def test_ep2_checkpoint_resumes_on_one_process_and_trains_on(ep_runs, tmp_path):
    cfg, root = ep_runs("attribute", 2)
    step5 = _step(root, "sharded", 5)
    shutil.copytree(step5, tmp_path / "one" / "checkpoints" / "step_00000005")
    trainer = Trainer(load_config(RunConfig, str(cfg), _overrides(tmp_path / "one", "attribute", steps=7)))
    assert trainer.resume() and trainer.step == 5  # one process, no EP, no FSDP
    full, _ = dcp.consolidate_model_state(step5)
    for name, t in trainer.model.state_dict().items():
        assert torch.equal(t, full[name]), name
    assert trainer.train()["step"] == 7
    assert (tmp_path / "one" / "checkpoints" / "step_00000007.pt").is_file()  # replicated: one file


def _rerun(rank, world, cfg_path, out):
    Trainer(load_config(RunConfig, str(cfg_path), _overrides(out, "token", _ep_fsdp(world)))).train()


@pytest.mark.world_size(2)
def test_ep2_with_fsdp_resumed_at_the_same_size_is_bit_exact(ep_runs, tmp_path):
    """The job stopped after its step-5 checkpoint (a killed step-10 write left a .partial
    directory), rerun: the step-10 weights are bit-identical to the uninterrupted run's (every
    rank's RNG state restored, the shards loaded as they were saved)."""
    cfg, root = ep_runs("token", 2)
    shutil.copytree(_step(root, "sharded", 5), _step(tmp_path, "out", 5))
    (tmp_path / "out" / "checkpoints" / "step_00000010.partial").mkdir()
    run_distributed(_rerun, world_size=2, args=(cfg, tmp_path / "out"), timeout_s=300)
    want, _ = dcp.consolidate_model_state(_step(root, "sharded", 10))
    got, _ = dcp.consolidate_model_state(_step(tmp_path, "out", 10))
    for name, w in want.items():
        assert torch.equal(got[name], w), name
    assert read_metrics(tmp_path / "out")[-1]["step"] == 10


def _resume_and_train_on(rank, cfg_path, out, router, extra, src, start, stop):
    """Resume the checkpoint `src` (step `start`) copied into `out` with this run's sizes: the
    gathered weights equal the source's consolidated ones exactly; train to step `stop`; that
    step's checkpoint consolidates to the weights the run holds."""
    trainer = Trainer(load_config(RunConfig, str(cfg_path), _overrides(out, router, extra, steps=stop, every=stop)))
    assert trainer.resume() and trainer.step == start
    got = full_model_state_dict(trainer.model)  # collective: every rank gathers
    if rank == 0:
        want, _ = dcp.consolidate_model_state(src)
        assert got.keys() == want.keys()
        for name, w in want.items():
            assert torch.equal(got[name], w), f"{out}: {name} differs from {src} after the resume"
    result = trainer.train()
    assert result["step"] == stop and result["nonfinite_total"] == 0
    final = full_model_state_dict(trainer.model)
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
    if rank == 0:
        saved, _ = dcp.consolidate_model_state(_step(out.parent, out.name, stop))
        assert saved.keys() == final.keys()
        for name, t in final.items():
            assert torch.equal(saved[name], t), f"{out}: {name}: the step-{stop} checkpoint differs from the model"


def _on_four(rank, world, cfg_path, root, src):
    # EP = 8 cannot divide a world of 4: a ConfigError (the train CLI exits 2) naming the key.
    with pytest.raises(ConfigError, match=r"train.expert_parallel_size=8 must divide the world size 4"):
        Trainer(load_config(RunConfig, str(cfg_path), _overrides(root / "bad", "token", ["train.expert_parallel_size=8"])))
    _resume_and_train_on(rank, cfg_path, root / "ep4", "token", ["train.expert_parallel_size=4"], src, 5, 7)
    _resume_and_train_on(rank, cfg_path, root / "ep2dp2", "token", _ep_fsdp(2), src, 5, 7)


def _on_two(rank, world, cfg_path, root):
    _resume_and_train_on(rank, cfg_path, root / "on_two", "token", _ep_fsdp(2), _step(root, "ep4", 7), 7, 9)


@pytest.mark.world_size(4)
def test_ep2_checkpoint_resumes_on_four_processes_then_back_on_two(ep_runs, tmp_path):
    """2 -> 4: an EP = 2 + FSDP checkpoint resumes with EP = 4 (no FSDP) and with EP = 2 x dp = 2
    (FSDP) on 4 ranks; 4 -> 2: what the EP = 4 run saved resumes with EP = 2 + FSDP on 2 ranks."""
    cfg, root = ep_runs("token", 2)
    src = _step(root, "sharded", 5)
    for run in ("ep4", "ep2dp2"):
        shutil.copytree(src, _step(tmp_path, run, 5))
    run_distributed(_on_four, world_size=4, args=(cfg, tmp_path, src), timeout_s=420)
    for run, ep, fsdp in (("ep4", 4, False), ("ep2dp2", 2, True)):
        marker = dcp.read_marker(_step(tmp_path, run, 7))
        assert (marker["world_size"], marker["expert_parallel_size"], marker["fsdp"]) == (4, ep, fsdp)
    shutil.copytree(_step(tmp_path, "ep4", 7), _step(tmp_path, "on_two", 7))
    run_distributed(_on_two, world_size=2, args=(cfg, tmp_path), timeout_s=300)


def test_ep_checkpoint_evaluates_like_its_consolidated_file_and_the_replicated_model(ep_runs, tmp_path):
    from uniperceiver import eval as eval_cli
    from uniperceiver.convert.__main__ import main as convert_main
    from uniperceiver.modeling.model import UniPerceiver

    cfg, root = ep_runs("attribute", 2)
    sharded = _step(root, "sharded", 10)
    single = tmp_path / "model.pt"
    assert convert_main(["--consolidate", str(sharded), str(single)]) == 0
    full, _ = dcp.consolidate_model_state(sharded)
    for k, v in UniPerceiver.from_pretrained(single).state_dict().items():
        assert torch.equal(v, full[k]), k
    metrics = {}
    for name, ckpt in (("sharded", sharded), ("single", single),
                       ("replicated", root / "ref" / "checkpoints" / "step_00000010.pt")):
        rc = eval_cli.main([str(cfg), f"eval.checkpoint={ckpt}", f"eval.output_json={tmp_path / name}.json"])
        assert rc == 0, name
        metrics[name] = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]
    assert metrics["single"]["cls"]
    assert metrics["sharded"] == metrics["single"] == metrics["replicated"], metrics


def test_expert_parallel_size_that_cannot_divide_exits_2(tmp_path):
    cfg = write_tiny_run(tmp_path)
    res = run_train([str(cfg), "train.expert_parallel_size=3", "train.fsdp=true"])
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "train.expert_parallel_size=3 must divide model.moe.routing.num_experts=8" in res.stderr
    res = run_train([str(cfg), "train.expert_parallel_size=2", "train.fsdp=true"])  # one process
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "train.expert_parallel_size=2 must divide the world size 1" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()  # refused before anything is created


def test_torchrun_tiny_cpu_expert_parallel_token_router_with_fsdp(tmp_path):
    """launch/README.md's command: 2 ranks, EP = 2, token router, each rank on another task."""
    out = tmp_path / "out"
    res = run_train([str(REPO / "configs/debug/tiny_cpu.yaml"), "train.expert_parallel_size=2",
                     "model.moe.routing.router=token", "train.sampling=round_robin", "train.fsdp=true",
                     "train.max_steps=2", "train.checkpoint_every=2", f"train.output_dir={out}",
                     "train.tensorboard=false"], nproc=2, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    marker = dcp.read_marker(out / "checkpoints" / "step_00000002")
    assert marker["expert_parallel_size"] == 2 and marker["fsdp"] is True and marker["world_size"] == 2
