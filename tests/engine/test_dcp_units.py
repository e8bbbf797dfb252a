"""Distributed checkpoints (engine/dcp.py) without a model: expert tensors sharded as DTensors on
an "ep" mesh dim reshard 2 -> 4, 2 -> 1, 4 -> 2 and 4 -> 1 through DCP; a directory counts only
once complete (a killed write is ignored, the previous one is used); rotation never deletes the
newest; the FSDP trainer's grad clipping counts sharded and replicated gradients once."""
import json
import subprocess
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from dist_utils import run_distributed
from uniperceiver.engine import dcp

E = 8  # global experts


def _global_experts() -> torch.Tensor:
    return torch.arange(E * 3 * 5, dtype=torch.float32).reshape(E, 3, 5) / 7.0


def _state(world: int, ep: int) -> dict:
    """A rank's state: an expert tensor Shard(0) on mesh['ep'] (replicated over 'dp'), a plain
    dense tensor, and an object entry."""
    full = _global_experts()
    if world == 1:
        experts = full.clone()
    else:
        mesh = init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("dp", "ep"))
        ep_rank = mesh["ep"].get_local_rank()
        local = full[ep_rank * (E // ep):(ep_rank + 1) * (E // ep)].clone()
        experts = DTensor.from_local(local, mesh["ep"], [Shard(0)], run_check=False)
    return {"model": {"moe.weight_EOI": experts, "dense.weight": torch.full((4,), 3.0)}, "trainer": {"step": 7}}


def _blank(state: dict) -> dict:
    """The same layout filled with garbage, to load into."""
    def wipe(t):
        if isinstance(t, DTensor):
            return DTensor.from_local(torch.full_like(t.to_local(), -1.0), t.device_mesh, t.placements, run_check=False)
        return torch.full_like(t, -1.0)
    return {"model": {k: wipe(v) for k, v in state["model"].items()}, "trainer": {"step": 0}}


def _save_worker(rank, world, out, ep):
    dcp.save_dcp(_state(world, ep), out, step=7, keep_last=2, info={"world_size": world, "expert_parallel_size": ep})


def _load(world, out, ep):
    blank = _blank(_state(world, ep))
    path = dcp.latest_dcp_checkpoint(out)[1]
    dcp.load_dcp(blank, path)
    experts = blank["model"]["moe.weight_EOI"]
    full = experts.full_tensor() if isinstance(experts, DTensor) else experts
    assert torch.equal(full, _global_experts())
    if isinstance(experts, DTensor):  # this rank holds exactly its own experts
        ep_rank = experts.device_mesh.get_local_rank()
        assert torch.equal(experts.to_local(), _global_experts()[ep_rank * (E // ep):(ep_rank + 1) * (E // ep)])
    assert torch.equal(blank["model"]["dense.weight"], torch.full((4,), 3.0))
    assert blank["trainer"]["step"] == 7


def _four_ranks(rank, world, written_by_2, out_4):
    _load(world, written_by_2, ep=2)  # 2 -> 4 ranks, EP 2 -> 2 (dp 1 -> 2)
    _load(world, written_by_2, ep=4)  # 2 -> 4 ranks, EP 2 -> 4
    _save_worker(rank, world, out_4, ep=4)


def _two_ranks(rank, world, written_by_4):
    _load(world, written_by_4, ep=2)  # 4 -> 2 ranks, EP 4 -> 2
    _mixed_norm(rank, world)


def test_expert_dtensor_reshards_across_world_and_ep_sizes(tmp_path):
    """EP=2 on 2 ranks -> 4 ranks (EP 2 and 4) -> EP=4 on 4 ranks -> 2 ranks (EP 2) and 1 process."""
    run_distributed(_save_worker, world_size=2, args=(tmp_path / "by2", 2), timeout_s=120)
    run_distributed(_four_ranks, world_size=4, args=(tmp_path / "by2", tmp_path / "by4"), timeout_s=180)
    run_distributed(_two_ranks, world_size=2, args=(tmp_path / "by4",), timeout_s=120)
    _load(1, tmp_path / "by2", ep=1)
    _load(1, tmp_path / "by4", ep=1)


def _single(out, step, keep_last=2):
    state = {"model": {"w": torch.full((3,), float(step))}, "trainer": {"step": step}}
    return dcp.save_dcp(state, out, step, keep_last, info={"world_size": 1, "config": {}})


def test_half_written_directory_is_ignored_and_previous_used(tmp_path):
    _single(tmp_path, 3)
    good = _single(tmp_path, 6)
    ckpts = tmp_path / "checkpoints"
    # A job killed mid-write: the .partial dir of step 9, and (a non-atomic filesystem) a
    # renamed dir without its marker.
    (ckpts / "step_00000009.partial").mkdir()
    (ckpts / "step_00000009.partial" / "__0_0.distcp").write_bytes(b"half")
    import shutil

    shutil.copytree(good, ckpts / "step_00000012")
    (ckpts / "step_00000012" / dcp.MARKER).unlink()
    shutil.copytree(good, ckpts / "step_00000015")
    (ckpts / "step_00000015" / dcp.MARKER).write_text('{"format": "uniperceiver-moe/dcp-v1", "st')  # truncated
    assert dcp.latest_dcp_checkpoint(tmp_path) == (6, good)
    state = {"model": {"w": torch.zeros(3)}, "trainer": {"step": 0}}
    dcp.load_dcp(state, good)
    assert state["trainer"]["step"] == 6 and torch.equal(state["model"]["w"], torch.full((3,), 6.0))
    # consolidating a killed write fails clearly (exit 2), naming the directory
    res = subprocess.run([sys.executable, "-m", "uniperceiver.convert", "--consolidate", str(ckpts / "step_00000012"),
                          str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "step_00000012 is not a complete distributed checkpoint" in res.stderr
    assert not (tmp_path / "out.pt").exists()


def test_rotation_keeps_the_newest_complete_ones(tmp_path):
    for step in (1, 2):
        _single(tmp_path, step)
    (tmp_path / "checkpoints" / "step_00000002.partial").mkdir()  # older killed write: cleaned up
    for step in (3, 4):
        _single(tmp_path, step)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000003", "step_00000004"]
    info = json.loads((tmp_path / "checkpoints" / "step_00000004" / dcp.MARKER).read_text())
    assert info["step"] == 4 and info["format"] == dcp.FORMAT
    # Re-writing an existing complete step keeps it (a valid checkpoint at every instant) ...
    before = (tmp_path / "checkpoints" / "step_00000004" / "__0_0.distcp").read_bytes()
    state = {"model": {"w": torch.full((3,), -1.0)}, "trainer": {"step": 4}}
    dcp.save_dcp(state, tmp_path, 4, 2, info={"world_size": 1})
    assert [s for s, _ in dcp.list_dcp_checkpoints(tmp_path)] == [3, 4]
    assert (tmp_path / "checkpoints" / "step_00000004" / "__0_0.distcp").read_bytes() == before
    assert not list((tmp_path / "checkpoints").glob("*.partial"))
    # ... while a marker-less leftover under the final name (a killed write) is replaced.
    (tmp_path / "checkpoints" / "step_00000004" / dcp.MARKER).unlink()
    dcp.save_dcp(state, tmp_path, 4, 2, info={"world_size": 1})
    loaded = {"model": {"w": torch.zeros(3)}, "trainer": {"step": 0}}
    dcp.load_dcp(loaded, tmp_path / "checkpoints" / "step_00000004")
    assert torch.equal(loaded["model"]["w"], torch.full((3,), -1.0))


def _mixed_norm(rank, world):
    """fsdp.clip_grad_norm_ over DTensor grads (sharded and replicated) and plain ones."""
    from uniperceiver.engine.fsdp import clip_grad_norm_

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    torch.manual_seed(0)  # the same global tensors on every rank
    full_a, full_b, plain = torch.randn(6, 3), torch.randn(4), torch.randn(2)
    ref = torch.cat([full_a.flatten(), full_b, plain]).norm()
    params = []
    for full, placement in ((full_a, Shard(0)), (full_b, Replicate())):
        p = torch.nn.Parameter(DTensor.from_local(full.chunk(world)[rank].clone() if placement == Shard(0) else full.clone(),
                                                  mesh, [placement], run_check=False))
        p.grad = DTensor.from_local(p.to_local().clone(), mesh, [placement], run_check=False)
        params.append(p)
    q = torch.nn.Parameter(plain.clone())
    q.grad = plain.clone()
    total = clip_grad_norm_(params + [q], max_norm=1.0)
    assert torch.allclose(total, ref), (total, ref)
    scale = 1.0 / (ref + 1e-6)
    assert torch.allclose(params[0].grad.full_tensor(), full_a * scale)
    assert torch.allclose(q.grad, plain * scale)
    assert dist.get_world_size() == world
