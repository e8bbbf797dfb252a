"""The device-resident static execution path (GPU / torch.compile) equals the CPU sorted path,
compiles without graph breaks, and never reads a value on the host in capacity mode."""
import contextlib
import itertools

import pytest
import torch

from moe import MoEConfig, MoEFFN, MoELinear, RoutingContext, make_plan
from moe.backends import tutel_available
from moe.static import capacity_on_device, make_static_plan, run_static, static_linear


def _run(execution, *, router="token", top_k=2, dropless=False, cf=1.0, pad=False, prioritized=False,
         expert_type="linear", training=True, segments=(0,)):
    torch.manual_seed(1)
    cfg = MoEConfig(num_experts=4, top_k=top_k, router=router, noise="none", dropless=dropless,
                    capacity_factor_train=cf, capacity_factor_eval=cf, min_capacity=1,
                    batch_prioritized=prioritized, expert_type=expert_type, execution=execution, backend="torch")
    layer = MoEFFN(8, 16, cfg).double().train(training)
    x = torch.randn(3, 5, 8, dtype=torch.double, requires_grad=True)
    pad_BL = None
    if pad:
        pad_BL = torch.zeros(3, 5, dtype=torch.bool)
        pad_BL[0, 3:] = True
        pad_BL[2, 1:] = True
    ctx = RoutingContext(segments, attributes_SA=torch.eye(8, dtype=torch.double)[: len(segments)],
                         task_ids_S=torch.arange(len(segments)), padding_mask_BL=pad_BL)
    y, decision = layer(x, ctx)
    loss = y.pow(2).sum()
    if decision.losses is not None:
        loss = loss + decision.losses.load_balance + 0.5 * decision.losses.z_loss
    loss.backward()
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    return [y.detach(), x.grad, *grads], decision


@pytest.mark.parametrize("top_k,dropless,cf,pad,prioritized,expert_type", [
    (1, False, 0.5, True, False, "linear"), (2, False, 0.5, True, True, "linear"),
    (2, False, 1.25, False, False, "ffn"), (1, False, 0.5, False, True, "ffn"),
    (2, False, 0.5, True, False, "ffn"), (2, True, 0.5, True, False, "linear"),
    (1, True, 0.5, False, False, "ffn"), (2, True, 0.5, True, True, "ffn"),
])
def test_static_token_dispatch_equals_sorted(top_k, dropless, cf, pad, prioritized, expert_type):
    kw = dict(top_k=top_k, dropless=dropless, cf=cf, pad=pad, prioritized=prioritized, expert_type=expert_type)
    ref, d_ref = _run("sorted", **kw)
    got, d_got = _run("static", **kw)
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(d_ref.stats.kept_E, d_got.stats.kept_E)
    assert d_ref.stats.drop_rate == d_got.stats.drop_rate


@pytest.mark.parametrize("router,expert_type", [("attribute", "linear"), ("task", "linear"), ("attribute", "ffn")])
def test_static_merged_layer_equals_sorted(router, expert_type):
    kw = dict(router=router, expert_type=expert_type, segments=(0, 2))
    ref, _ = _run("sorted", **kw)
    got, _ = _run("static", **kw)
    for a, b in zip(ref, got):
        # the sorted path's gate gradient is a float32 dot product (moe.merge), even in float64
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_static_merge_is_bit_exact_in_float32():
    torch.manual_seed(0)
    layer = MoELinear(16, 8, cfg=MoEConfig(noise="none"))
    ctx = RoutingContext((0, 3), attributes_SA=torch.eye(8)[:2])
    with torch.no_grad():
        d = layer.route(ctx)
        w_ref, b_ref = layer.merged_weights(d, static=False)
        w_got, b_got = layer.merged_weights(d, static=True)
    assert torch.equal(w_ref, w_got) and torch.equal(b_ref, b_got)


def test_capacity_on_device_matches_the_host_formula():
    cfg = MoEConfig(num_experts=8, top_k=2, capacity_factor_train=1.25, min_capacity=4)
    for n in [0, 1, 3, 7, 64, 1000, 4093]:
        dev = capacity_on_device(torch.tensor(n), 1.25, 2, 8, 4)
        assert int(dev) == cfg.capacity(n, training=True), n


def test_static_plan_drops_exactly_what_make_plan_drops():
    torch.manual_seed(0)
    ids_TK = torch.stack([torch.randperm(5)[:2] for _ in range(40)])
    valid_T = torch.rand(40) > 0.2
    prio_T = torch.rand(40)
    for capacity, prio in itertools.product([None, 3, 9], [None, prio_T]):
        ref = make_plan(ids_TK, 5, capacity, valid_T, prio)
        got = make_static_plan(ids_TK, 5, 16 if capacity else None, capacity, valid_T, prio)
        assert torch.equal(ref.kept_TK, got.kept_TK)
        assert torch.equal(ref.routed_E, got.routed_E)
        kept = got.kept_TK
        assert torch.equal(ref.locations_TK.long()[kept], got.locations_TK[kept])
        # grouped layout: kept rows first, blocks by expert of the kept counts
        n_kept = int(kept.sum())
        rows_expert = ids_TK.reshape(-1)[torch.sort(got.row_of_TK.reshape(-1)).indices][:n_kept]
        assert torch.equal(rows_expert, torch.sort(rows_expert).values)
        assert got.offsets_E[:-1].tolist() == torch.cumsum(ref.routed_E.clamp(max=capacity or 10**9), 0)[:-1].tolist()


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
def test_grouped_layout_equals_padded():
    """The grouped-GEMM layout (CUDA sm90 in production; torch's CPU kernel here) gives the same
    outputs and gradients as the capacity-padded batched matmul."""
    torch.manual_seed(0)
    ids_TK = torch.stack([torch.randperm(4)[:2] for _ in range(24)])
    plan = make_static_plan(ids_TK, 4, 8, 8)
    gates_TK = torch.rand(24, 2, requires_grad=True)
    w_EOI = torch.randn(4, 16, 8, requires_grad=True)
    b_EO = torch.randn(4, 16, requires_grad=True)
    x_TI = torch.randn(24, 8, requires_grad=True)
    results = []
    for layout in ("padded", "grouped"):
        y = run_static(x_TI, gates_TK, plan, lambda x, p, lay: static_linear(x, w_EOI, b_EO, p, lay), layout)
        grads = torch.autograd.grad(y.pow(2).sum(), (x_TI, gates_TK, w_EOI, b_EO))
        results.append((y, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _compile_fullgraph(fn):
    torch._dynamo.reset()
    # backend="eager": dynamo still has to capture the whole function in one graph (fullgraph
    # raises on any break), without spending test time in a compiler.
    return torch.compile(fn, fullgraph=True, backend="eager")


@pytest.mark.parametrize("router,pad", [("token", True), ("token", False), ("attribute", False)])
def test_layers_compile_without_graph_breaks(router, pad):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, router=router, noise="none", backend="torch")  # execution auto
    layer = MoEFFN(8, 16, cfg).train()
    x = torch.randn(3, 5, 8, requires_grad=True)
    pad_BL = torch.zeros(3, 5, dtype=torch.bool)
    pad_BL[0, 3:] = True
    ctx = RoutingContext((0, 2), attributes_SA=torch.eye(8)[:2], padding_mask_BL=pad_BL if pad else None)

    def step(x_BLD):
        y_BLD, decision = layer(x_BLD, ctx)
        return y_BLD, decision.losses.load_balance

    y, lb = _compile_fullgraph(step)(x)
    (y.sum() + lb).backward()
    y_ref, lb_ref = step(x)  # eager on CPU: the sorted path
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lb, lb_ref)
    torch._dynamo.reset()


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    """Make every way of reading a tensor's value on the host raise."""
    def boom(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} on a hot path")
        return raiser

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "cpu", "nonzero", "__int__", "__float__", "__bool__", "__index__"):
            m.setattr(torch.Tensor, name, boom(name))
        m.setattr(torch, "nonzero", boom("torch.nonzero"))
        yield


@pytest.mark.parametrize("router,expert_type,pad,training", [
    ("token", "linear", True, True), ("token", "ffn", False, True), ("token", "linear", True, False),
    ("context", "linear", True, True), ("attribute", "linear", False, True), ("attribute", "linear", False, False),
])
def test_static_path_never_syncs_in_capacity_mode(monkeypatch, router, expert_type, pad, training):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, router=router, noise="none", backend="torch", execution="static",
                    expert_type=expert_type, capacity_factor_train=0.75)
    layer = MoEFFN(8, 16, cfg).train(training)
    x = torch.randn(3, 5, 8, requires_grad=True)
    pad_BL = torch.zeros(3, 5, dtype=torch.bool)
    pad_BL[1, 2:] = True
    ctx = RoutingContext((0, 2), attributes_SA=torch.eye(8)[:2], padding_mask_BL=pad_BL if pad else None)
    with no_host_sync(monkeypatch), torch.set_grad_enabled(training):
        y, decision = layer(x, ctx)
        if training:
            loss = y.pow(2).sum()
            if decision.losses is not None:
                loss = loss + decision.losses.load_balance
            loss.backward()
    assert torch.isfinite(y).all()
    if training:
        assert layer.fc1.weight_EOI.grad is not None


@pytest.mark.parametrize("router,expert_type", [("token", "linear"), ("token", "ffn"), ("attribute", "ffn")])
def test_dropless_static_syncs_once_per_layer_call(monkeypatch, router, expert_type):
    """Dropless on the padded layout reads the largest expert load once per layer call (the plan
    shared by fc1 and fc2 caches it). Whole-FFN experts under a segment router are dropless."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, router=router, noise="none", backend="torch", execution="static",
                    dropless=router == "token", expert_type=expert_type)
    layer = MoEFFN(8, 16, cfg).eval()
    x = torch.randn(2, 6, 8)
    calls = []
    real_int = torch.Tensor.__int__

    def counting_int(self):
        calls.append(1)
        return real_int(self)

    monkeypatch.setattr(torch.Tensor, "__int__", counting_int)
    with torch.no_grad():
        layer(x, RoutingContext(attributes_SA=torch.eye(8)[:1]))
    assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropless", [False, True])
def test_cuda_static_layer_equals_cpu_sorted(dtype, dropless):
    """On CUDA the layer runs static (grouped GEMM in bf16 on sm90+, padded bmm otherwise)."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, router="token", noise="none", backend="torch", expert_type="ffn",
                    dropless=dropless, capacity_factor_train=1.0)
    layer = MoEFFN(64, 128, cfg).train()
    x = torch.randn(4, 32, 64)
    ref = layer(x, RoutingContext())[0]
    got = layer.cuda().to(dtype)(x.cuda().to(dtype), RoutingContext())[0]
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float().cpu(), ref, rtol=tol, atol=tol)


@pytest.mark.skipif(not tutel_available(), reason="Tutel is not installed")
@pytest.mark.parametrize("top_k,dropless,pad,expert_type", [(1, False, True, "ffn"), (2, False, True, "linear"),
                                                            (2, True, False, "ffn")])
def test_tutel_backend_runs_the_static_plan(top_k, dropless, pad, expert_type):
    """Tutel's encode/decode kernels on the static plan's padded layout give the torch result."""
    def run(backend, execution):
        torch.manual_seed(1)
        cfg = MoEConfig(num_experts=4, top_k=top_k, router="token", noise="none", dropless=dropless,
                        capacity_factor_train=0.75, min_capacity=1, expert_type=expert_type, execution=execution,
                        backend=backend)
        layer = MoEFFN(8, 16, cfg).train()
        x = torch.randn(3, 5, 8, requires_grad=True)
        pad_BL = torch.zeros(3, 5, dtype=torch.bool)
        pad_BL[0, 3:] = True
        y, _ = layer(x, RoutingContext(padding_mask_BL=pad_BL if pad else None))
        y.pow(2).sum().backward()
        return [y.detach(), x.grad] + [p.grad for p in layer.parameters() if p.grad is not None]

    for a, b in zip(run("torch", "sorted"), run("tutel", "static")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
