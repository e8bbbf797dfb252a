"""The one-node merged segment linear (training path of data-independent routers) against the
two-step path it replaces: merge_expert_weights, then segment_linear. Same forward values and the
same gradients for the input, every expert row, the biases and the gates: bit for bit on the
oneDNN fp32 CPU products where MoELinear uses it, to rounding elsewhere (float64 here)."""
from __future__ import annotations

import pytest
import torch

from moe.kernels import use_onednn
from moe.merge import merge_expert_weights, merged_segment_linear, segment_linear


def _inputs(dtype, batch, starts, length, ids, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    E, O, I = 5, 12, 8
    x = torch.randn(batch, length, I, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(E, O, I, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(E, O, generator=g, dtype=dtype, requires_grad=True) if bias else None
    gates = torch.rand(len(starts), len(ids[0]), generator=g, dtype=dtype).requires_grad_(True)
    return x, w, b, torch.tensor(ids), gates


def _run(fused: bool, dtype, batch, starts, length, ids, bias=True):
    x, w, b, ids_SK, gates = _inputs(dtype, batch, starts, length, ids, bias)
    if fused:
        y = merged_segment_linear(x, w, b, ids_SK, gates, starts)
    else:
        w_S, b_S = merge_expert_weights(w, b, ids_SK, gates)
        y = segment_linear(x, w_S, b_S, starts)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
    y.backward(grad)
    leaves = [x, w, gates] + ([b] if bias else [])
    return y.detach(), [t.grad for t in leaves]


CASES = [
    # batch, segment starts, length, expert ids per segment (top-k)
    (1, (0,), 9, [[1, 3]]),
    (1, (0, 4, 7), 11, [[1, 3], [3, 0], [4, 2]]),  # expert 3 chosen by two segments
    (3, (0, 2), 6, [[2, 2], [0, 1]]),  # batch > 1 (non-contiguous segment rows); k repeats an expert
    (2, (0, 5), 7, [[4], [4]]),  # top-1, both segments on one expert
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,starts,length,ids", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_equals_merge_then_segment_linear_bit_for_bit(dtype, batch, starts, length, ids, bias):
    y_ref, grads_ref = _run(False, dtype, batch, starts, length, ids, bias)
    y, grads = _run(True, dtype, batch, starts, length, ids, bias)
    same = torch.equal if use_onednn(y) else lambda a, b: torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert same(y, y_ref)
    for got, ref in zip(grads, grads_ref):
        assert got.dtype == ref.dtype and same(got, ref)


def test_the_layer_takes_it_in_fp32_cpu_training_only():
    from moe import MoEConfig, MoELinear, RoutingContext

    if not use_onednn(torch.zeros(1)):
        pytest.skip("no oneDNN fp32 CPU products here")
    cfg = MoEConfig(num_experts=4, top_k=2, router="attribute")
    layer = MoELinear(8, 12, cfg).eval()  # no router noise: both calls take the same decision
    x = torch.randn(1, 7, 8)
    ctx = RoutingContext(attributes_SA=torch.randn(2, 8), segment_starts=(0, 3))
    seen = []
    real = MoELinear._fused_merge
    MoELinear._fused_merge = lambda self, *a: seen.append(real(self, *a)) or seen[-1]
    try:
        y, _ = layer(x, ctx)
        y.sum().backward()
        with torch.no_grad():
            y2, _ = layer(x, ctx)
    finally:
        MoELinear._fused_merge = real
    assert seen == [True, False] and torch.equal(y.detach(), y2)
    assert layer.weight_EOI.grad is not None


def test_unchosen_experts_get_zero_gradient_and_the_router_gets_its_share():
    y, (gx, gw, gg, gb) = _run(True, torch.float64, 1, (0, 4), 8, [[0, 1], [1, 2]])
    assert torch.count_nonzero(gw[3:]) == 0 and torch.count_nonzero(gb[3:]) == 0
    assert torch.count_nonzero(gw[:3].flatten(1), dim=1).min() > 0
    assert gg.abs().min() > 0


def test_gradcheck():
    x, w, b, ids, gates = _inputs(torch.float64, 2, (0, 3), 5, [[0, 2], [1, 0]])
    fn = lambda x, w, b, g: merged_segment_linear(x, w, b, ids, g, (0, 3))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, gates))


def test_segments_that_do_not_fit_are_refused():
    x, w, b, ids, gates = _inputs(torch.float32, 1, (0, 4), 4, [[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="do not fit"):
        merged_segment_linear(x, w, b, ids, gates, (0, 4))
    with pytest.raises(ValueError, match="routing rows"):
        merged_segment_linear(x, w, b, ids[:1], gates[:1], (0, 2))
