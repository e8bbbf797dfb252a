"""MoE against dense and against the obviously-correct per-token loop (STYLE habit 6).

- a 1-expert MoE with copied weights equals the dense layer, in outputs and every gradient;
- batched experts (row blocks) equal a per-expert Python loop, over a sweep of shapes;
- merged execution equals the gate-weighted mixture for linear experts.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe import MoEConfig, MoEFFN, MoELinear, RoutingContext
from moe.experts import grouped_ffn, grouped_linear, loop_reference


def _ctx(router, segment_starts=(0,), num_segments=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return RoutingContext(
        segment_starts=segment_starts,
        attributes_SA=torch.randint(0, 2, (num_segments, 8), generator=g).float(),
        task_ids_S=torch.randint(0, 4, (num_segments,), generator=g),
        modality_ids_S=torch.randint(0, 3, (num_segments,), generator=g),
    )


ALL_ROUTERS = ["attribute", "task", "modality", "token", "context"]


@pytest.mark.parametrize("router", ALL_ROUTERS)
@pytest.mark.parametrize("expert_type", ["linear", "ffn"])
def test_one_expert_ffn_equals_dense(router, expert_type):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=1, top_k=1, router=router, noise="none", dropless=True,
                    expert_type=expert_type, backend="torch")
    moe_ffn = MoEFFN(12, 20, cfg).train()
    fc1, fc2 = nn.Linear(12, 20), nn.Linear(20, 12)
    with torch.no_grad():
        fc1.weight.copy_(moe_ffn.fc1.weight_EOI[0]); fc1.bias.copy_(moe_ffn.fc1.bias_EO[0])
        fc2.weight.copy_(moe_ffn.fc2.weight_EOI[0]); fc2.bias.copy_(moe_ffn.fc2.bias_EO[0])
    x = torch.randn(3, 5, 12)
    x_moe, x_dense = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(3, 5, 12)
    y_moe, _ = moe_ffn(x_moe, _ctx(router))
    y_dense = fc2(F.gelu(fc1(x_dense)))
    y_moe.backward(grad)
    y_dense.backward(grad)
    torch.testing.assert_close(y_moe, y_dense)
    torch.testing.assert_close(x_moe.grad, x_dense.grad)
    torch.testing.assert_close(moe_ffn.fc1.weight_EOI.grad[0], fc1.weight.grad)
    torch.testing.assert_close(moe_ffn.fc1.bias_EO.grad[0], fc1.bias.grad)
    torch.testing.assert_close(moe_ffn.fc2.weight_EOI.grad[0], fc2.weight.grad)
    torch.testing.assert_close(moe_ffn.fc2.bias_EO.grad[0], fc2.bias.grad)
    # With one expert the gate is the constant 1: the router learns nothing, but is reached.
    for p in moe_ffn.fc1.router.parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0


@pytest.mark.parametrize("router", ["attribute", "token"])
def test_one_expert_linear_with_out_slice_equals_dense(router):
    torch.manual_seed(1)
    cfg = MoEConfig(num_experts=1, top_k=1, router=router, noise="none", dropless=True)
    layer = MoELinear(8, 24, cfg=cfg)
    x = torch.randn(2, 4, 8)
    y, _ = layer(x, _ctx(router), out_slice=slice(8, 24))
    torch.testing.assert_close(y, F.linear(x, layer.weight_EOI[0, 8:], layer.bias_EO[0, 8:]))


@pytest.mark.parametrize("tokens,hidden,experts,top_k", [
    (1, 4, 1, 1), (7, 8, 4, 1), (16, 8, 4, 2), (33, 16, 8, 2), (20, 6, 5, 3),
])
def test_batched_experts_equal_python_loop(tokens, hidden, experts, top_k):
    torch.manual_seed(tokens)
    cfg = MoEConfig(num_experts=experts, top_k=top_k, router="token", noise="none", dropless=True,
                    expert_type="ffn", backend="torch")
    moe_ffn = MoEFFN(hidden, 2 * hidden, cfg)
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    y, dec = moe_ffn(x, RoutingContext())
    fc1, fc2 = moe_ffn.fc1, moe_ffn.fc2
    fns = [
        (lambda e: lambda v: F.linear(F.gelu(F.linear(v, fc1.weight_EOI[e], fc1.bias_EO[e])),
                                      fc2.weight_EOI[e], fc2.bias_EO[e]))(e)
        for e in range(experts)
    ]
    ref = loop_reference(x[0], dec.expert_ids_TK, dec.gates_TK, fns)
    torch.testing.assert_close(y[0], ref)
    # gradients, including the router's through the gates
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y[0], [x, fc1.weight_EOI, fc2.bias_EO, fc1.router.wg.weight], g, retain_graph=True)
    ref_grads = torch.autograd.grad(ref, [x, fc1.weight_EOI, fc2.bias_EO, fc1.router.wg.weight], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("counts", [[3, 0, 5], [0, 0, 4], [2, 2, 2]])
def test_grouped_kernels_equal_loop_over_blocks(counts):
    torch.manual_seed(0)
    w_EOI, b_EO = torch.randn(3, 5, 4), torch.randn(3, 5)
    w2_EDF = torch.randn(3, 4, 5)
    x = torch.randn(sum(counts), 4)
    starts = [0, counts[0], counts[0] + counts[1], sum(counts)]
    ref = torch.cat([F.linear(x[starts[e]:starts[e + 1]], w_EOI[e], b_EO[e]) for e in range(3)])
    torch.testing.assert_close(grouped_linear(x, w_EOI, b_EO, counts), ref)
    ref_ffn = torch.cat([F.linear(F.gelu(F.linear(x[starts[e]:starts[e + 1]], w_EOI[e], b_EO[e])), w2_EDF[e])
                         for e in range(3)])
    torch.testing.assert_close(grouped_ffn(x, w_EOI, b_EO, w2_EDF, None, counts), ref_ffn)


@pytest.mark.parametrize("threaded", [False, True])
def test_grouped_ffn_split_into_blocks_equals_autograd(monkeypatch, threaded):
    """Experts with more rows than a block are computed in several blocks (and, threaded, their
    weight gradients accumulated by several jobs): outputs and every gradient stay exact."""
    import moe.experts as experts

    monkeypatch.setattr(experts, "_BLOCK_BYTES", 1)  # blocks of the 64-row minimum
    monkeypatch.setattr(experts, "_PARALLEL_MIN_JOB_COST", 0 if threaded else 1 << 62)
    torch.manual_seed(0)
    counts = [300, 0, 70, 10]  # 5 blocks, 2 blocks, 1 block; expert 1 empty
    x = torch.randn(sum(counts), 8, dtype=torch.float64, requires_grad=True)
    params = [torch.randn(4, 12, 8, dtype=torch.float64, requires_grad=True),
              torch.randn(4, 12, dtype=torch.float64, requires_grad=True),
              torch.randn(4, 8, 12, dtype=torch.float64, requires_grad=True),
              torch.randn(4, 8, dtype=torch.float64, requires_grad=True)]
    assert len(experts._sub_blocks(experts._row_ranges(counts), 12 * 8)) == 8
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = grouped_ffn(x, *params, counts)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x] + params, g)
    finally:
        torch.set_num_threads(threads)
    w1, b1, w2, b2 = params
    bounds = [0, 300, 300, 370, 380]
    ref = torch.cat([F.linear(F.gelu(F.linear(x[bounds[e]:bounds[e + 1]], w1[e], b1[e])), w2[e], b2[e])
                     for e in range(4)])
    torch.testing.assert_close(y, ref)
    for a, b in zip(grads, torch.autograd.grad(ref, [x] + params, g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("router", ["attribute", "task", "modality"])
def test_merged_linear_equals_gate_weighted_mixture(router):
    torch.manual_seed(2)
    cfg = MoEConfig(num_experts=4, top_k=2, router=router, noise="none")
    layer = MoELinear(6, 10, cfg=cfg)
    ctx = _ctx(router, segment_starts=(0, 3), num_segments=2, seed=3)
    x = torch.randn(2, 7, 6, requires_grad=True)
    y, dec = layer(x, ctx)
    pieces = []
    for s, (a, b) in enumerate([(0, 3), (3, 7)]):
        acc = 0
        for k in range(2):
            e = int(dec.expert_ids_SK[s, k])
            acc = acc + dec.gates_SK[s, k] * F.linear(x[:, a:b], layer.weight_EOI[e], layer.bias_EO[e])
        pieces.append(acc)
    ref = torch.cat(pieces, dim=1)
    torch.testing.assert_close(y, ref)
    params = [x, layer.weight_EOI, layer.bias_EO] + list(layer.router.parameters())
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, params, g, retain_graph=True), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("router", ["attribute", "task"])
def test_whole_ffn_experts_under_segment_routing_are_the_exact_mixture(router):
    torch.manual_seed(4)
    cfg = MoEConfig(num_experts=4, top_k=2, router=router, noise="none", expert_type="ffn")
    moe_ffn = MoEFFN(6, 9, cfg)
    ctx = _ctx(router, segment_starts=(0, 2), num_segments=2, seed=5)
    x = torch.randn(3, 5, 6)
    y, dec = moe_ffn(x, ctx)
    fc1, fc2 = moe_ffn.fc1, moe_ffn.fc2
    ffn = lambda v, e: F.linear(F.gelu(F.linear(v, fc1.weight_EOI[e], fc1.bias_EO[e])), fc2.weight_EOI[e], fc2.bias_EO[e])
    ref = torch.cat([
        sum(dec.gates_SK[s, k] * ffn(x[:, a:b], int(dec.expert_ids_SK[s, k])) for k in range(2))
        for s, (a, b) in enumerate([(0, 2), (2, 5)])
    ], dim=1)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("expert_type", ["linear", "ffn"])
def test_experts_run_side_by_side_on_threads_give_the_same_result(monkeypatch, expert_type):
    """The threaded expert path (one expert group per intra-op thread) equals the serial one."""
    import moe.experts as experts

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, router="token", noise="none", dropless=True, expert_type=expert_type)
    layer = MoEFFN(16, 24, cfg)
    x = torch.randn(2, 10, 16, requires_grad=True)
    results = []
    threads = torch.get_num_threads()
    pools = []
    real_workers = experts._expert_workers
    monkeypatch.setattr(experts, "_expert_workers", lambda n: pools.append(n) or real_workers(n))
    try:
        for parallel in (False, True):
            monkeypatch.setattr(experts, "_PARALLEL_MIN_JOB_COST", 0 if parallel else 1 << 62)
            torch.set_num_threads(2)
            layer.zero_grad(set_to_none=True)
            x.grad = None
            y, _ = layer(x, RoutingContext())
            y.pow(2).sum().backward()
            results.append([y.detach(), x.grad] + [p.grad for p in layer.parameters()])
            assert torch.get_num_threads() == 2  # the caller's setting is never changed
            assert bool(pools) == parallel  # forward and backward went to the worker threads
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_expert_workers_are_single_threaded_and_report_errors(monkeypatch):
    import moe.experts as experts

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    try:
        experts._run_expert_jobs([lambda: seen.append(torch.get_num_threads())] * 2, [1 << 30] * 2, on_cpu=True)
        assert seen == [1, 1] and torch.get_num_threads() == 2

        def boom():
            raise RuntimeError("expert 3 failed")

        with pytest.raises(RuntimeError, match="expert 3 failed"):
            experts._run_expert_jobs([boom, lambda: None], [1 << 30] * 2, on_cpu=True)
    finally:
        torch.set_num_threads(threads)
