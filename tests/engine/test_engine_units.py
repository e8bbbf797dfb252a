"""Task sampling, sample streams, schedule, optimizer groups and checkpoint files."""
import math
from collections import Counter

import pytest
import torch

from uniperceiver.config import ModelConfig, ModelMoEConfig, OptimConfig
from uniperceiver.engine import (TaskSampler, TaskStream, build_optimizer, list_checkpoints,
                                 load_latest_checkpoint, lr_factor, save_checkpoint)
from uniperceiver.modeling.model import UniPerceiver


def test_weighted_sampling_is_per_rank_reproducible_and_follows_weights():
    a, b = TaskSampler([2.0, 1.0, 1.0], seed=3, rank=0), TaskSampler([2.0, 1.0, 1.0], seed=3, rank=0)
    other = TaskSampler([2.0, 1.0, 1.0], seed=3, rank=1)
    draws = [a.task_at(s) for s in range(4000)]
    assert draws == [b.task_at(s) for s in range(4000)]
    assert draws != [other.task_at(s) for s in range(4000)]  # ranks draw independently
    freq = Counter(draws)
    assert abs(freq[0] / 4000 - 0.5) < 0.03 and abs(freq[1] / 4000 - 0.25) < 0.03
    assert a.counts_before(100) == [draws[:100].count(t) for t in range(3)]


def test_round_robin_is_offset_by_rank():
    r0, r1 = TaskSampler([1, 1, 1], 0, 0, "round_robin"), TaskSampler([1, 1, 1], 0, 1, "round_robin")
    assert [r0.task_at(s) for s in range(4)] == [0, 1, 2, 0]
    assert [r1.task_at(s) for s in range(4)] == [1, 2, 0, 1]


def test_streams_split_ranks_and_are_pure():
    s0, s1 = TaskStream(10, 2, 0, 0, 0, 2), TaskStream(10, 2, 0, 0, 1, 2)
    epoch0 = [i for k in range(2) for i, _ in s0.batch(k)] + [i for k in range(2) for i, _ in s1.batch(k)]
    assert len(set(epoch0)) == 8  # disjoint across ranks within an epoch
    assert s0.batch(7) == TaskStream(10, 2, 0, 0, 0, 2).batch(7)  # batch k is a pure function
    seeds = [seed for k in range(5) for _, seed in s0.batch(k)]
    assert len(set(seeds)) == len(seeds)


def test_warmup_cosine_schedule():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-6, warmup_steps=10)
    assert lr_factor(0, cfg, 110) == 0.0 and lr_factor(5, cfg, 110) == 0.5
    assert lr_factor(10, cfg, 110) == 1.0
    assert math.isclose(lr_factor(60, cfg, 110), 0.5, rel_tol=1e-9)
    assert lr_factor(110, cfg, 110) == 1e-3  # floor min_lr / lr


def test_no_decay_groups():
    model = UniPerceiver(ModelConfig(d_model=32, num_layers=2, num_heads=4, d_ffn=64, image_size=32,
                                     moe=ModelMoEConfig(enabled=True)))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.2))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.2 and opt.param_groups[1]["weight_decay"] == 0.0
    assert "embed.patch.weight" in decay and "encoder.layers.0.qkv.weight_EOI" in decay
    assert "encoder.layers.1.fc1.weight" in decay
    for plain in ("embed.word.weight", "embed.text_pos.weight", "encoder.layers.0.gamma_1", "encoder.layers.0.norm1.weight",
                  "encoder.layers.1.fc1.bias", "encoder.layers.0.qkv.router.wg.weight",
                  "encoder.layers.0.qkv.router.tag_transform.0.weight", "predictor.logit_scale.img_cls"):
        assert plain not in decay, plain


def test_checkpoints_keep_last_and_skip_corrupt(tmp_path, caplog):
    for step in (1, 2, 3):
        save_checkpoint({"model": {"w": torch.tensor(float(step))}, "optimizer": {}, "step": step}, tmp_path, step, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    newest = list_checkpoints(tmp_path)[-1][1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    state, path = load_latest_checkpoint(tmp_path)
    assert state["step"] == 2 and path.name == "step_00000002.pt"
    assert "step_00000003.pt" in caplog.text and "truncated or corrupt" in caplog.text


def test_fp16_loss_scale_recovers_faster_late_in_training():
    from uniperceiver.engine.trainer import loss_scale_growth_interval

    assert loss_scale_growth_interval(100, 1024.0) == 200  # early: the normal window
    assert loss_scale_growth_interval(6000, 1024.0) == 5  # late and small: recover quickly
    assert loss_scale_growth_interval(6000, 4096.0) == 200


@pytest.mark.parametrize("max_norm", [float("inf"), 100.0, 1e-3])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_clip_grad_norm_is_torchs_bit_for_bit_and_writes_nothing_when_it_does_not_clip(max_norm, bad):
    from uniperceiver.engine.optim import clip_grad_norm_

    g = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(30, 20), (7,), (3, 4, 5)]]
    for p in ours:
        p.grad = torch.randn(p.shape, generator=g) * 0.1
    if bad is not None:
        ours[1].grad[3] = bad
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ref, ours):
        p.grad = q.grad.clone()
    versions = [p.grad._version for p in ours]
    total, total_ref = clip_grad_norm_(ours, max_norm), torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert torch.equal(total, total_ref) or (total.isnan() and total_ref.isnan())
    for p, q in zip(ours, ref):
        assert torch.equal(p.grad.nan_to_num(7, 8, 9), q.grad.nan_to_num(7, 8, 9))
    clipped = bad is not None or max_norm == 1e-3
    assert ([p.grad._version for p in ours] != versions) == clipped  # no pass over the grads otherwise
