"""GPU checks (opt-in: `pytest -m gpu`): CUDA equals CPU, and the Tutel backend equals torch."""
import pytest
import torch

from moe import MoEConfig, MoEFFN, RoutingContext
from moe.backends import tutel_available


def _run(layer, x, ctx):
    x = x.clone().requires_grad_()
    y, _ = layer(x, ctx)
    y.pow(2).sum().backward()
    return [y.detach().cpu(), x.grad.cpu()] + [p.grad.cpu() for p in layer.parameters() if p.grad is not None]


@pytest.mark.gpu
@pytest.mark.parametrize("router,expert_type", [("attribute", "linear"), ("token", "ffn"), ("context", "linear")])
def test_cuda_equals_cpu(router, expert_type):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, router=router, noise="none", backend="torch",
                    expert_type=expert_type, capacity_factor_train=0.75)
    layer = MoEFFN(16, 32, cfg).train()
    ctx = RoutingContext(segment_starts=(0, 3), attributes_SA=torch.eye(8)[:2])
    x = torch.randn(2, 7, 16)
    cpu = _run(layer, x, ctx)
    layer.zero_grad(set_to_none=True)
    gpu = _run(layer.cuda(), x.cuda(), ctx)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not tutel_available(), reason="Tutel is not installed")
@pytest.mark.parametrize("top_k,dropless", [(1, False), (2, False), (2, True)])
def test_cuda_tutel_equals_torch(top_k, dropless):
    results = []
    for backend in ("torch", "tutel"):
        torch.manual_seed(0)
        cfg = MoEConfig(num_experts=4, top_k=top_k, router="token", noise="none", backend=backend,
                        expert_type="ffn", capacity_factor_train=0.75, dropless=dropless)
        layer = MoEFFN(16, 32, cfg).cuda().train()
        results.append(_run(layer, torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1)).cuda(),
                            RoutingContext()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
