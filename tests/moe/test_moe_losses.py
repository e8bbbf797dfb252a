"""Load-balance and z-loss against hand-computed values; returned on decisions, never global."""
import math

import pytest
import torch

from moe import MoEConfig, MoEFFN, RoutingContext, load_balance_loss, router_z_loss, weighted_aux_loss


def test_load_balance_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]])
    top1 = probs.argmax(-1)  # [0, 0, 2, 0] -> f = [3/4, 0, 1/4]
    mean_p = [1.9 / 4, 1.0 / 4, 1.1 / 4]
    expected = 3 * (0.75 * mean_p[0] + 0.0 * mean_p[1] + 0.25 * mean_p[2])
    assert float(load_balance_loss(probs, top1)) == pytest.approx(expected)
    uniform = torch.full((6, 3), 1 / 3)
    assert float(load_balance_loss(uniform, torch.tensor([0, 1, 2, 0, 1, 2]))) == pytest.approx(1.0)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = [math.log(2.0), math.log(math.exp(1) + math.exp(2))]
    assert float(router_z_loss(logits)) == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2)


def test_losses_come_back_on_the_decision_and_backprop_to_the_router():
    torch.manual_seed(0)
    layer = MoEFFN(8, 16, MoEConfig(router="token", num_experts=4, noise="none")).train()
    x = torch.randn(2, 6, 8)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    _, dec = layer(x, RoutingContext(padding_mask_BL=pad))
    valid = ~pad.reshape(-1)
    logits = dec.logits_TE[valid]
    probs = torch.softmax(logits, -1)
    f = torch.bincount(logits.argmax(-1), minlength=4).float() / valid.sum()
    torch.testing.assert_close(dec.losses.load_balance, 4 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(dec.losses.z_loss, torch.logsumexp(logits, -1).pow(2).mean())
    total = weighted_aux_loss([dec], load_balance_weight=0.01, z_loss_weight=0.001)
    torch.testing.assert_close(total, 0.01 * dec.losses.load_balance + 0.001 * dec.losses.z_loss)
    total.backward()
    assert torch.count_nonzero(layer.fc1.router.wg.weight.grad) > 0
    assert weighted_aux_loss([], 1.0, 1.0) is None
