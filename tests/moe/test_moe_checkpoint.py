"""Expert checkpoints keep global expert ids: 1 -> 2 -> 4 -> 1 resharding is bit-exact.

Sharded models are built offline as "virtual" ranks (ExpertParallel without a process group),
exactly what a resharding tool does; the same code runs inside a real EP group.
"""
import pytest
import torch
from torch import nn

from moe import MoEConfig, MoEFFN, MoELinear
from moe.checkpoint import (
    expert_shard,
    full_expert_state,
    load_expert_checkpoint,
    load_expert_shards,
    save_expert_shard,
)
from moe.parallel import ExpertParallel, expert_parameters

CFG = MoEConfig(num_experts=8, router="token")


class Block(nn.Module):
    def __init__(self, ep=None, cfg=CFG):
        super().__init__()
        self.attn_out = MoELinear(6, 6, cfg=cfg, ep_group=ep and ExpertParallel(None, ep[1], ep[0], cfg.num_experts))
        self.ffn = MoEFFN(6, 10, cfg, ep_group=ep and ExpertParallel(None, ep[1], ep[0], cfg.num_experts))


def _ranks(ep_size, seed):
    torch.manual_seed(seed)  # different init, so a bad load cannot pass by accident
    return [Block((r, ep_size)) for r in range(ep_size)]


def test_reshard_1_2_4_1_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    single = Block()
    original = full_expert_state([expert_shard(single)])
    shards = [expert_shard(single)]
    for step, ep_size in enumerate([2, 4, 1]):
        models = _ranks(ep_size, seed=step + 1)
        for m in models:
            load_expert_shards(m, shards)
        shards = [expert_shard(m) for m in models]
        assert [s["ep_size"] for s in shards] == [ep_size] * ep_size
        assert models[-1].ffn.fc1.weight_EOI.shape[0] == 8 // ep_size
    final = full_expert_state(shards)
    assert final.keys() == original.keys()
    for name in original:
        assert torch.equal(final[name], original[name]), name
    # the unsharded model's ordinary state dict matches the original too
    assert torch.equal(models[0].ffn.fc2.weight_EOI, single.ffn.fc2.weight_EOI)


def test_files_round_trip_across_ep_sizes(tmp_path):
    models = _ranks(4, seed=0)
    for m in models:
        save_expert_shard(m, str(tmp_path / "ep4"))
    two = _ranks(2, seed=9)
    for m in two:
        load_expert_checkpoint(m, str(tmp_path / "ep4"))
    assert torch.equal(two[1].attn_out.weight_EOI, torch.cat([models[2].attn_out.weight_EOI, models[3].attn_out.weight_EOI]))


def test_mismatched_expert_count_fails_clearly():
    shards = [expert_shard(Block())]
    other = Block(cfg=MoEConfig(num_experts=4, router="token"))
    with pytest.raises(ValueError, match=r"checkpoint has 8 experts for 'attn_out.weight_EOI', the model expects num_experts=4"):
        load_expert_shards(other, shards)


def test_missing_shard_fails_clearly():
    models = _ranks(2, seed=0)
    with pytest.raises(ValueError, match=r"lack global experts \[4, 5, 6, 7\]"):
        load_expert_shards(Block(), [expert_shard(models[0])])


def test_checkpoint_keys_are_unchanged_by_sharding():
    keys_single = set(Block().state_dict())
    keys_sharded = set(Block((1, 2)).state_dict())
    assert keys_single == keys_sharded
    assert "ffn.fc1.router.wg.weight" in keys_single and "attn_out.bias_EO" in keys_single
    assert expert_parameters(Block()) == []  # unsharded: DDP reduces experts as usual
    assert len(expert_parameters(Block((0, 2)))) == 6


def test_virtual_shard_cannot_run_forward():
    from moe import RoutingContext

    with pytest.raises(RuntimeError, match="virtual expert-parallel shard"):
        Block((0, 2)).ffn(torch.randn(1, 3, 6), RoutingContext())
