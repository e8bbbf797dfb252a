"""Token dispatch: plans, round trips, exact capacity drops, padding, backends, plan reuse."""
import pytest
import torch

from moe import MoEConfig, MoEFFN, MoELinear, RoutingContext, make_plan
from moe.backends import tutel_available
from moe.dispatch import combine_slots, gather_slots

needs_tutel = pytest.mark.skipif(not tutel_available(), reason="Tutel is not installed")


def test_dispatch_combine_round_trip():
    torch.manual_seed(0)
    ids_TK = torch.randint(0, 4, (10, 2))
    while (ids_TK[:, 0] == ids_TK[:, 1]).any():
        ids_TK = torch.randint(0, 4, (10, 2))
    plan = make_plan(ids_TK, 4, capacity=None)
    x_TD = torch.randn(10, 3)
    x_MD = gather_slots(x_TD, plan)
    # grouped by expert, every slot present exactly once
    assert plan.counts == torch.bincount(ids_TK.reshape(-1), minlength=4).tolist()
    experts_M = ids_TK.reshape(-1)[plan.slot_idx_M]
    assert torch.equal(experts_M, torch.sort(experts_M, stable=True).values)
    gates_TK = torch.full((10, 2), 0.5)
    torch.testing.assert_close(combine_slots(x_MD, gates_TK, plan), x_TD)


def test_capacity_drops_are_counted_exactly_in_priority_order():
    # 6 tokens, top-2, 3 experts, capacity 2. First choices go before second choices.
    ids_TK = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 1], [1, 2]])
    plan = make_plan(ids_TK, 3, capacity=2)
    assert plan.routed_E.tolist() == [4, 5, 3]
    assert plan.counts == [2, 2, 2]
    kept = set(plan.slot_idx_M.tolist())
    # expert 0: first choices of tokens 0, 1 (token 2's first choice and token 3's second dropped)
    # expert 1: first choices of tokens 3, 5; expert 2: first choice of 4, second choice of 1
    assert kept == {0 * 2 + 0, 1 * 2 + 0, 3 * 2 + 0, 5 * 2 + 0, 4 * 2 + 0, 1 * 2 + 1}
    # Tutel-style locations agree: rank within the expert, dropped ones >= capacity
    assert plan.locations_TK.tolist() == [[0, 2], [1, 1], [2, 3], [0, 3], [0, 4], [1, 2]]


def test_batch_prioritized_keeps_highest_gates():
    ids_TK = torch.tensor([[0], [0], [0], [1]])
    priority_T = torch.tensor([0.1, 0.9, 0.5, 0.3])
    plan = make_plan(ids_TK, 2, capacity=2, priority_T=priority_T)
    assert sorted(plan.token_idx_M.tolist()) == [1, 2, 3]
    plan_pos = make_plan(ids_TK, 2, capacity=2)
    assert sorted(plan_pos.token_idx_M.tolist()) == [0, 1, 3]


def test_padding_is_not_routed_or_counted():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, router="token", noise="none", dropless=True, expert_type="ffn")
    layer = MoEFFN(8, 16, cfg)
    x = torch.randn(2, 5, 8)
    pad = torch.tensor([[False] * 5, [False, False, True, True, True]])
    y, dec = layer(x, RoutingContext(padding_mask_BL=pad))
    assert int(dec.stats.routed_E.sum()) == 7 * 2
    assert torch.count_nonzero(y[1, 2:]) == 0
    # the real tokens are unaffected by the padding
    y_real, _ = layer(x[1:, :2], RoutingContext())
    torch.testing.assert_close(y[1:, :2], y_real)


def test_layer_drop_rate_matches_capacity():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=1, router="token", noise="none", capacity_factor_train=0.5,
                    min_capacity=0, expert_type="ffn")
    layer = MoEFFN(8, 16, cfg).train()
    y, dec = layer(torch.randn(1, 32, 8), RoutingContext())
    capacity = 4  # ceil(0.5 * 32 * 1 / 4)
    assert dec.stats.capacity == capacity
    expected_dropped = int(torch.clamp(dec.stats.routed_E - capacity, min=0).sum())
    assert dec.stats.num_dropped == expected_dropped
    assert dec.plan.num_kept == 32 - expected_dropped
    assert torch.count_nonzero(y.abs().sum(-1)) == 32 - expected_dropped
    assert dec.stats.drop_rate == pytest.approx(expected_dropped / 32)
    assert dec.stats.imbalance == pytest.approx(float(dec.stats.routed_E.max()) / 8)


def test_eval_capacity_and_min_capacity():
    cfg = MoEConfig(num_experts=8, top_k=2, router="token", capacity_factor_train=1.0,
                    capacity_factor_eval=2.0, min_capacity=4)
    assert cfg.capacity(64, training=True) == 16
    assert cfg.capacity(64, training=False) == 32
    assert cfg.capacity(4, training=True) == 4
    assert MoEConfig(router="token", dropless=True).capacity(64, True) is None


def test_sibling_reuses_the_plan():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, router="token", noise="none")
    qkv, out = MoELinear(8, 24, cfg=cfg), MoELinear(8, 8, cfg=cfg, has_router=False)
    x = torch.randn(2, 3, 8)
    ctx = RoutingContext()
    h, dec = qkv(x, ctx)
    y, dec2 = out(h[..., :8], ctx, dec)
    assert dec2 is dec
    with pytest.raises(ValueError, match="cannot route"):
        out(torch.randn(1, 3, 8), ctx, dec)
    # out_slice computes only the requested rows of every expert
    q, _ = qkv(x, ctx, dec, out_slice=slice(0, 8))
    torch.testing.assert_close(q, h[..., :8])


@needs_tutel
@pytest.mark.parametrize("top_k,dropless,bpr", [(1, False, False), (2, False, True), (2, True, False)])
@pytest.mark.parametrize("expert_type", ["linear", "ffn"])
def test_tutel_backend_equals_torch(top_k, dropless, bpr, expert_type):
    results = []
    for backend in ("torch", "tutel"):
        torch.manual_seed(0)
        cfg = MoEConfig(num_experts=4, top_k=top_k, router="token", noise="none", backend=backend,
                        capacity_factor_train=0.75, dropless=dropless, batch_prioritized=bpr,
                        expert_type=expert_type)
        layer = MoEFFN(8, 16, cfg).train()
        x = torch.randn(2, 9, 8, requires_grad=True)
        pad = torch.zeros(2, 9, dtype=torch.bool)
        pad[1, 6:] = True
        y, dec = layer(x, RoutingContext(padding_mask_BL=pad))
        y.pow(2).sum().backward()
        results.append([y, x.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tutel_backend_missing_fails_clearly(monkeypatch):
    import moe.backends as backends

    monkeypatch.setattr(backends, "tutel_available", lambda: False)
    with pytest.raises(ImportError, match="backend='tutel'"):
        backends.resolve_backend("tutel", torch.device("cpu"))
    assert backends.resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("top_k,bpr", [(1, False), (2, False), (2, True)])
def test_capacity_dispatch_equals_loop_over_kept_slots(top_k, bpr):
    torch.manual_seed(3)
    from moe.experts import loop_reference
    import torch.nn.functional as F

    cfg = MoEConfig(num_experts=4, top_k=top_k, router="token", noise="none", expert_type="ffn",
                    capacity_factor_train=0.6, min_capacity=1, batch_prioritized=bpr)
    layer = MoEFFN(6, 10, cfg).train()
    x = torch.randn(1, 20, 6)
    pad = torch.zeros(1, 20, dtype=torch.bool)
    pad[0, -3:] = True
    y, dec = layer(x, RoutingContext(padding_mask_BL=pad))
    assert dec.stats.num_dropped > 0
    fc1, fc2 = layer.fc1, layer.fc2
    fns = [(lambda e: lambda v: F.linear(F.gelu(F.linear(v, fc1.weight_EOI[e], fc1.bias_EO[e])),
                                         fc2.weight_EOI[e], fc2.bias_EO[e]))(e) for e in range(4)]
    kept_gates = dec.gates_TK * dec.plan.kept_TK  # dropped and padded slots contribute nothing
    ref = loop_reference(x[0], dec.expert_ids_TK, kept_gates, fns)
    torch.testing.assert_close(y[0], ref)
    g = torch.randn_like(ref)
    params = [fc1.weight_EOI, fc2.bias_EO, fc1.router.wg.weight]
    for a, b in zip(torch.autograd.grad(y[0], params, g, retain_graph=True), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b)
