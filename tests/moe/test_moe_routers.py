"""Routers: config validation, gating orders, determinism per attribute/id, noise, fp32 gates."""
import math

import pytest
import torch

from moe import MoEConfig, MoEFFN, MoELinear, RoutingContext, build_router, topk_gating
from moe.routers import SegmentDecision, TokenDecision


@pytest.mark.parametrize("kwargs,field", [
    ({"num_experts": 0}, "num_experts"),
    ({"top_k": 3, "num_experts": 2}, "top_k"),
    ({"router": "bogus"}, "router"),
    ({"noise": "jitter", "router": "attribute"}, "jitter"),
    ({"capacity_factor_train": 0.0}, "capacity_factor_train"),
    ({"capacity_factor_eval": -1.0}, "capacity_factor_eval"),
    ({"min_capacity": -1}, "min_capacity"),
    ({"backend": "deepspeed"}, "backend"),
    ({"expert_type": "conv"}, "expert_type"),
    ({"uniform_routing": True, "router": "task"}, "uniform_routing"),
    ({"z_loss_weight": -0.1}, "z_loss_weight"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**kwargs)


def test_topk_gating_orders():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    ids, gates = topk_gating(logits, 2, "softmax_topk")
    assert ids.tolist() == [[1, 2]]
    p = torch.softmax(logits, -1)[0]
    torch.testing.assert_close(gates[0], torch.stack([p[1], p[2]]) / (p[1] + p[2]))
    ids, gates = topk_gating(logits, 2, "topk_softmax")
    torch.testing.assert_close(gates[0], torch.softmax(torch.tensor([3.0, 2.0]), -1))
    ids, gates = topk_gating(logits, 1, "softmax_topk")  # top-1 keeps the raw probability
    torch.testing.assert_close(gates[0, 0], p[1])


def _ctx_two_equal_segments():
    row = torch.tensor([1.0, 0, 0, 1, 1, 0, 0, 0])
    return RoutingContext(
        segment_starts=(0, 3),
        attributes_SA=torch.stack([row, row]),
        task_ids_S=torch.tensor([2, 2]),
        modality_ids_S=torch.tensor([1, 1]),
    )


@pytest.mark.parametrize("router", ["attribute", "task", "modality"])
def test_segment_routers_decide_identically_for_identical_ids(router):
    torch.manual_seed(0)
    r = build_router(16, MoEConfig(router=router, noise="gaussian")).eval()
    d1, d2 = r(_ctx_two_equal_segments()), r(_ctx_two_equal_segments())
    assert isinstance(d1, SegmentDecision)
    assert torch.equal(d1.expert_ids_SK[0], d1.expert_ids_SK[1])
    assert torch.equal(d1.gates_SK[0], d1.gates_SK[1])
    assert torch.equal(d1.expert_ids_SK, d2.expert_ids_SK) and torch.equal(d1.gates_SK, d2.gates_SK)


@pytest.mark.parametrize("router", ["token", "context"])
def test_token_routers_decide_identically_for_identical_tokens(router):
    torch.manual_seed(0)
    layer = MoELinear(16, 16, cfg=MoEConfig(router=router, num_experts=8)).eval()
    tok = torch.randn(16)
    x = tok.expand(2, 4, 16).contiguous()
    _, dec = layer(x, RoutingContext())
    assert isinstance(dec, TokenDecision)
    assert (dec.expert_ids_TK == dec.expert_ids_TK[0]).all()
    assert torch.equal(dec.gates_TK, dec.gates_TK[:1].expand_as(dec.gates_TK))


def test_gaussian_noise_in_training_only_with_std_over_experts():
    torch.manual_seed(0)
    cfg = MoEConfig(router="task", num_experts=8, noise="gaussian", noise_std=1.0)
    r = build_router(16, cfg)
    ctx = RoutingContext(task_ids_S=torch.zeros(4000, dtype=torch.long), segment_starts=tuple(range(4000)))
    clean = r.eval()(ctx).logits_SE
    noisy = r.train()(ctx).logits_SE
    assert torch.equal(r.eval()(ctx).logits_SE, clean)
    assert (noisy - clean).std().item() == pytest.approx(1 / 8, rel=0.05)


def test_jitter_perturbs_the_router_input_in_training_only():
    torch.manual_seed(0)
    cfg = MoEConfig(router="token", noise="jitter", jitter_eps=0.1)
    r = build_router(16, cfg)
    x = torch.randn(1, 50, 16)
    clean = r.eval()(x, RoutingContext()).logits_TE
    assert torch.equal(r.eval()(x, RoutingContext()).logits_TE, clean)
    assert not torch.equal(r.train()(x, RoutingContext()).logits_TE, clean)


@pytest.mark.parametrize("router", ["attribute", "token", "context"])
def test_gate_math_is_fp32_under_autocast(router):
    torch.manual_seed(0)
    layer = MoEFFN(16, 32, MoEConfig(router=router, noise="none"))
    ctx = RoutingContext(attributes_SA=torch.ones(1, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, dec = layer(torch.randn(2, 3, 16), ctx)
    gates = dec.gates_SK if isinstance(dec, SegmentDecision) else dec.gates_TK
    assert gates.dtype == torch.float32
    assert y.dtype == torch.bfloat16


def test_uniform_routing_is_balanced_and_keeps_router_gradients():
    torch.manual_seed(0)
    cfg = MoEConfig(router="token", num_experts=8, top_k=2, uniform_routing=True, noise="none",
                    expert_type="ffn", capacity_factor_train=1.0)
    layer = MoEFFN(16, 32, cfg).train()
    y, dec = layer(torch.randn(1, 64, 16), RoutingContext())
    assert dec.stats.routed_E.tolist() == [16] * 8
    assert dec.stats.drop_rate == 0.0 and dec.stats.imbalance == 1.0
    y.sum().backward()
    assert torch.count_nonzero(layer.fc1.router.wg.weight.grad) > 0


def test_context_router_ignores_padding_in_the_pool():
    torch.manual_seed(0)
    r = build_router(8, MoEConfig(router="context", noise="none"))
    with torch.no_grad():
        r.pool_query.normal_()
    x = torch.randn(1, 5, 8)
    pad = torch.tensor([[False, False, False, True, True]])
    a = r(x, RoutingContext(padding_mask_BL=pad)).logits_TE[:3]
    x2 = x.clone()
    x2[:, 3:] = 100.0  # changing padded tokens must not change real tokens' logits
    b = r(x2, RoutingContext(padding_mask_BL=pad)).logits_TE[:3]
    torch.testing.assert_close(a, b)
    # and the pooled context does matter: a different sequence changes the logits
    c = r(torch.cat([x[:, :1], torch.randn(1, 4, 8)], 1), RoutingContext()).logits_TE[:1]
    assert not torch.allclose(c, r(x, RoutingContext()).logits_TE[:1])


def test_every_router_kind_builds_and_trains():
    ctx = RoutingContext(segment_starts=(0, 2), attributes_SA=torch.ones(2, 8),
                         task_ids_S=torch.tensor([0, 1]), modality_ids_S=torch.tensor([0, 2]))
    for router in ["attribute", "task", "modality", "token", "context"]:
        for top_k in (1, 2):
            for gate_order in ("softmax_topk", "topk_softmax"):
                torch.manual_seed(0)
                layer = MoEFFN(8, 16, MoEConfig(router=router, top_k=top_k, gate_order=gate_order)).train()
                y, dec = layer(torch.randn(2, 4, 8), ctx)
                assert torch.isfinite(y).all()
                y.sum().backward()
                assert layer.fc1.weight_EOI.grad is not None
                assert math.isfinite(dec.losses.load_balance.item()) and math.isfinite(dec.losses.z_loss.item())
