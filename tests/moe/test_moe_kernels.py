"""moe.kernels: the oneDNN products equal torch's to float rounding, and fall back where they must."""
import pytest
import torch
import torch.nn.functional as F

import moe.kernels as kernels
from moe import MoEConfig, MoEFFN, MoELinear, RoutingContext
from moe.experts import grouped_ffn, grouped_linear

needs_onednn = pytest.mark.skipif(not kernels.use_onednn(torch.empty(0)), reason="oneDNN not available")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the oneDNN products actually taken."""
    calls = []
    real = kernels._ONEDNN_LINEAR

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(kernels, "_ONEDNN_LINEAR", counting)
    return calls


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear_in_outputs_and_gradients(onednn_calls, bias):
    torch.manual_seed(0)
    base = torch.randn(3, 9, 16, requires_grad=True)
    x = base[:, 2:7]  # a non-contiguous segment, as segment_linear passes it
    w = torch.randn(24, 16, requires_grad=True)
    b = torch.randn(24, requires_grad=True) if bias else None
    y = kernels.linear(x, w, b)
    ref = F.linear(x, w, b)
    assert y.shape == ref.shape == (3, 5, 24)
    torch.testing.assert_close(y, ref)
    assert len(onednn_calls) == 1
    g = torch.randn_like(y)
    params = [base, w] + ([b] if bias else [])
    for a, r in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, r)
    assert len(onednn_calls) == 2  # the input gradient too


def test_linear_falls_back_to_f_linear_exactly(monkeypatch, onednn_calls):
    torch.manual_seed(0)
    x64, w64 = torch.randn(4, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(kernels.linear(x64, w64), F.linear(x64, w64))  # float64: torch's kernels
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps F.linear's dtype rules
        assert kernels.linear(x, w).dtype == torch.bfloat16
    monkeypatch.setattr(kernels, "_X86_64", False)  # measured faster on x86-64 only
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))
    monkeypatch.setattr(kernels, "_X86_64", True)
    monkeypatch.setenv("MOE_ONEDNN", "0")
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))
    assert onednn_calls == []


@needs_onednn
def test_linear_into_writes_only_its_rows():
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 8), torch.randn(5, 8), torch.randn(5)
    out = torch.full((10, 5), 7.0)
    kernels.linear_into(x, w, b, out[2:8])
    torch.testing.assert_close(out[2:8], F.linear(x, w, b))
    assert (out[:2] == 7).all() and (out[8:] == 7).all()
    # a transposed view as the weight: x w (the input-gradient product)
    w2 = torch.randn(8, 5)
    torch.testing.assert_close(kernels.linear_new(x, w2.t()), x @ w2)


def _grouped_results(fn):
    torch.manual_seed(0)
    counts = [70, 0, 130, 56]
    x = torch.randn(sum(counts), 32, requires_grad=True)
    params = [torch.randn(4, 48, 32, requires_grad=True), torch.randn(4, 48, requires_grad=True),
              torch.randn(4, 32, 48, requires_grad=True), torch.randn(4, 32, requires_grad=True)]
    y = fn(x, params, counts)
    g = torch.randn_like(y)
    return [y.detach()] + list(torch.autograd.grad(y, [x] + params, g, allow_unused=True))


@needs_onednn
@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("kind", ["ffn", "linear", "linear_out_slice"])
def test_grouped_experts_on_onednn_equal_torch_kernels(monkeypatch, onednn_calls, threaded, kind):
    """Row-block expert products (forward and input gradients) through oneDNN agree with torch.mm,
    serial and on the worker threads, including a sliced (non-contiguous) weight."""
    import moe.experts as experts

    monkeypatch.setattr(experts, "_PARALLEL_MIN_JOB_COST", 0 if threaded else 1 << 62)
    fns = {
        "ffn": lambda x, p, c: grouped_ffn(x, *p, c),
        "linear": lambda x, p, c: grouped_linear(x, p[0], p[1], c),
        "linear_out_slice": lambda x, p, c: grouped_linear(x, p[0], p[1], c, out_slice=slice(8, 40)),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast = _grouped_results(fns[kind])
        assert onednn_calls, "the oneDNN path was not taken"
        monkeypatch.setenv("MOE_ONEDNN", "0")
        calls = len(onednn_calls)
        ref = _grouped_results(fns[kind])
        assert len(onednn_calls) == calls
    finally:
        torch.set_num_threads(threads)
    for a, r in zip(fast, ref):
        if r is None:
            assert a is None
        else:
            torch.testing.assert_close(a, r)


@needs_onednn
@pytest.mark.parametrize("router", ["attribute", "token"])
def test_layers_on_onednn_equal_torch_kernels(monkeypatch, router):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, router=router, noise="none", dropless=True)
    layers = [MoELinear(16, 24, cfg=cfg), MoEFFN(16, 40, cfg)]
    ctx = RoutingContext(attributes_SA=torch.tensor([[1.0, 0, 0, 1, 1, 0, 0, 0]]))
    x = torch.randn(2, 12, 16, requires_grad=True)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("MOE_ONEDNN", flag)
        out = []
        for layer in layers:
            y, _ = layer(x, ctx)
            out += [y.detach()] + list(torch.autograd.grad(y.square().sum(), [x] + list(layer.parameters())))
        results.append(out)
    for a, r in zip(*results):
        torch.testing.assert_close(a, r)
