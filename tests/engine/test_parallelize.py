"""The device mesh and expert shards of engine/parallelize.py (the contract FSDP/DCP build on)."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from dist_utils import run_distributed
from uniperceiver.config import ModelConfig, from_dict
from uniperceiver.engine.parallelize import (
    build_device_mesh,
    check_expert_parallel_size,
    full_model_state_dict,
    shard_experts,
)
from uniperceiver.modeling.model import UniPerceiver

TINY = {"d_model": 32, "num_layers": 2, "num_heads": 4, "d_ffn": 64, "image_size": 32, "patch_size": 16,
        "moe": {"enabled": True, "layers": "all", "routing": {"num_experts": 4, "top_k": 2}}}


def test_expert_parallel_size_is_validated():
    check_expert_parallel_size(4, 2, 8)
    check_expert_parallel_size(4, 1, None)
    with pytest.raises(ValueError, match="train.expert_parallel_size=3 must divide the world size 4"):
        check_expert_parallel_size(4, 3, 6)
    with pytest.raises(ValueError, match="must divide model.moe.routing.num_experts=6"):
        check_expert_parallel_size(4, 4, 6)
    with pytest.raises(ValueError, match="needs an MoE model"):
        check_expert_parallel_size(2, 2, None)


def _mesh_worker(rank, world):
    mesh = build_device_mesh(world, 2, "cpu")
    assert mesh.mesh_dim_names == ("dp", "ep") and tuple(mesh.shape) == (world // 2, 2)
    assert mesh["ep"].get_local_rank() == rank % 2 and mesh["dp"].get_local_rank() == rank // 2
    torch.manual_seed(0)
    model = UniPerceiver(from_dict(ModelConfig, TINY))
    full = {k: v.clone() for k, v in model.state_dict().items()}
    shard_experts(model, mesh)
    sharded = [(n, p) for n, p in model.named_parameters() if isinstance(p, DTensor)]
    assert sharded and all(n.endswith(("weight_EOI", "bias_EO")) for n, _ in sharded)
    for name, p in sharded:
        assert p.placements == (Shard(0),) and p.device_mesh == mesh["ep"]
        assert p.shape == full[name].shape and p.to_local().shape[0] == 2
        torch.testing.assert_close(p.to_local(), full[name][2 * (rank % 2): 2 * (rank % 2) + 2])
    gathered = full_model_state_dict(model)
    assert set(gathered) == set(full)
    for k, v in full.items():
        assert torch.equal(gathered[k], v), k
    dist.barrier()


@pytest.mark.world_size(2)
def test_mesh_and_expert_shards_on_two_ranks():
    run_distributed(_mesh_worker, world_size=2, timeout_s=180)


def test_exchange_bytes_of_both_strategies():
    from moe import MoELinear
    from uniperceiver.engine.parallelize import exchange_bytes
    from uniperceiver.modeling.attributes import task_attributes
    from uniperceiver.modeling.batch import Segment, Sequence

    torch.manual_seed(0)
    model = UniPerceiver(from_dict(ModelConfig, {**TINY, "moe": {**TINY["moe"], "routing": {"num_experts": 4, "top_k": 2,
                                                                                          "noise": "none"}}}))
    seq = Sequence([Segment("image", torch.randn(2, 3, 32, 32)), Segment("text", torch.tensor([[320, 49407]] * 2))],
                   attributes_SA=task_attributes("image_caption"))
    joint = model.encode_many([seq])
    assert joint.segment_tokens == [2 * (1 + 4), 2 * 2]  # [SPE] + 4 patches, then 2 words, per sample
    none = exchange_bytes(model, joint.decisions, joint.segment_tokens, ep_size=1)
    assert none["total"] == {"expert_fetch": 0, "token_all_to_all": 0}
    got = exchange_bytes(model, joint.decisions, joint.segment_tokens, ep_size=4, ep_rank=0)
    name, decision = joint.decisions[0]
    assert name == "layers.0.qkv"
    layer = model.encoder.layers[0]
    ids = decision.expert_ids_SK
    remote = {int(e) for e in ids.unique() if int(e) != 0}
    rows = sum(m.weight_EOI[0].numel() + m.bias_EO[0].numel() for m in (layer.qkv, layer.attn_out)) * 4
    assert got[name]["expert_fetch"] == len(remote) * rows
    slots = sum(n * int((ids[s] != 0).sum()) for s, n in enumerate(joint.segment_tokens))
    assert got[name]["token_all_to_all"] == slots * ((32 + 96) + (32 + 32)) * 4
    assert isinstance(layer.qkv, MoELinear)
