"""Expert-parallel placement without a process group ("virtual" shards, as one rank's model is
built offline): the state-dict keys do not depend on the sharding, only sharded experts are left
out of DDP, and a virtual shard refuses to run. (Resharding checkpoints across expert-parallel
sizes is torch.distributed.checkpoint's job: tests/engine/test_dcp_units.py.)"""
import pytest
import torch
from torch import nn

from moe import MoEConfig, MoEFFN, MoELinear
from moe.parallel import ExpertParallel, expert_parameters

CFG = MoEConfig(num_experts=8, router="token")


class Block(nn.Module):
    def __init__(self, ep=None, cfg=CFG):
        super().__init__()
        self.attn_out = MoELinear(6, 6, cfg=cfg, ep_group=ep and ExpertParallel(None, ep[1], ep[0], cfg.num_experts))
        self.ffn = MoEFFN(6, 10, cfg, ep_group=ep and ExpertParallel(None, ep[1], ep[0], cfg.num_experts))


def test_checkpoint_keys_are_unchanged_by_sharding():
    keys_single = set(Block().state_dict())
    keys_sharded = set(Block((1, 2)).state_dict())
    assert keys_single == keys_sharded
    assert "ffn.fc1.router.wg.weight" in keys_single and "attn_out.bias_EO" in keys_single
    assert expert_parameters(Block()) == []  # unsharded: DDP reduces experts as usual
    assert len(expert_parameters(Block((0, 2)))) == 6
    assert Block((1, 2)).ffn.fc1.weight_EOI.shape[0] == 4  # E / P local experts


def test_virtual_shard_cannot_run_forward():
    from moe import RoutingContext

    with pytest.raises(RuntimeError, match="virtual expert-parallel shard"):
        Block((0, 2)).ffn(torch.randn(1, 3, 6), RoutingContext())
