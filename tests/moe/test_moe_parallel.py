"""Expert parallelism on 2 gloo processes equals the single-process result.

Every rank builds the same full reference model (seed 0) and an expert-parallel copy holding
its half of the experts. Ranks get different token counts and different tasks. Outputs, input
gradients, expert gradients (on their owner) and router gradients (summed over ranks) must
equal the single-process model run on each rank's batch. `run_distributed` kills a hang.
"""
import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from moe import MoEConfig, MoEFFN, RoutingContext
from moe.backends import tutel_available
from moe.parallel import ddp_ignored_parameter_names, expert_parameters, reduce_expert_gradients

D, F = 8, 12


def _batch(rank, shape, router):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(*shape, D, generator=g)
    ctx = RoutingContext(
        segment_starts=(0, 2),
        task_ids_S=torch.tensor([rank, 3 - rank]),  # different tasks per rank
        attributes_SA=torch.eye(8)[[rank, 4 + rank]],
    )
    return x, ctx, torch.randn(*shape, D, generator=g)


def _copy_into_ep(ref, ep_model, ep_rank, num_local):
    ep_state = ep_model.state_dict()
    for name, t in ref.state_dict().items():
        if name.endswith(("weight_EOI", "bias_EO")):
            t = t[ep_rank * num_local:(ep_rank + 1) * num_local]
        ep_state[name] = t.clone()
    ep_model.load_state_dict(ep_state)


def _check_scenario(rank, world, cfg, shapes):
    torch.manual_seed(0)
    ref = MoEFFN(D, F, cfg).train()
    ep_model = MoEFFN(D, F, cfg, ep_group=dist.group.WORLD).train()
    num_local = cfg.num_experts // world
    _copy_into_ep(ref, ep_model, rank, num_local)

    # Reference: every rank's batch through the full model; losses summed over ranks.
    ref_outs, ref_xgrads = [], []
    for r in range(world):
        x, ctx, g = _batch(r, shapes[r], cfg.router)
        x.requires_grad_()
        y, _ = ref(x, ctx)
        (y * g).sum().backward()
        ref_outs.append(y.detach())
        ref_xgrads.append(x.grad)

    x, ctx, g = _batch(rank, shapes[rank], cfg.router)
    x.requires_grad_()
    y, _ = ep_model(x, ctx)
    (y * g).sum().backward()
    torch.testing.assert_close(y, ref_outs[rank], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_xgrads[rank], rtol=1e-5, atol=1e-6)
    ref_params = dict(ref.named_parameters())
    for name, p in ep_model.named_parameters():
        want = ref_params[name].grad
        if name.endswith(("weight_EOI", "bias_EO")):
            want = want[rank * num_local:(rank + 1) * num_local]
            got = p.grad
        else:
            got = None if p.grad is None else p.grad.clone()
            if got is not None:
                dist.all_reduce(got)
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0, name
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # DDP helpers: expert params are the sharded ones; their grads get the 1/world DDP scaling.
    names = ddp_ignored_parameter_names(ep_model)
    assert names and all(n.endswith(("weight_EOI", "bias_EO")) for n in names)
    before = expert_parameters(ep_model)[0][1].grad.clone()
    reduce_expert_gradients(ep_model, None, world)
    torch.testing.assert_close(expert_parameters(ep_model)[0][1].grad, before / world)


def _worker(rank, world, backend):
    equal, unequal = [(2, 6), (2, 6)], [(2, 5), (3, 7)]
    token = dict(router="token", num_experts=4, noise="none", backend=backend)
    scenarios = [
        # token routing with capacity drops (equal token counts, different content)
        (MoEConfig(top_k=2, expert_type="ffn", capacity_factor_train=0.5, min_capacity=1, **token), equal),
        (MoEConfig(top_k=1, expert_type="linear", capacity_factor_train=0.75, min_capacity=1,
                   batch_prioritized=True, **token), equal),
        # different token counts per rank: dropless, and capacity agreed across the group
        (MoEConfig(top_k=2, expert_type="ffn", dropless=True, **token), unequal),
        (MoEConfig(top_k=2, expert_type="linear", capacity_factor_train=4.0, **token), unequal),
        (MoEConfig(top_k=2, router="context", num_experts=4, noise="none", backend=backend,
                   expert_type="ffn", dropless=True), unequal),
    ]
    if backend == "torch":
        scenarios += [
            # different tasks per rank: merged linear experts (chosen experts fetched) ...
            (MoEConfig(top_k=2, router="task", num_experts=4, noise="none"), unequal),
            (MoEConfig(top_k=2, router="attribute", num_experts=4, noise="none"), unequal),
            # ... and whole-FFN experts (segment decision dispatched dropless over all-to-all)
            (MoEConfig(top_k=2, router="task", num_experts=4, noise="none", expert_type="ffn"), unequal),
        ]
    for cfg, shapes in scenarios:
        _check_scenario(rank, world, cfg, shapes)


@pytest.mark.world_size(2)
def test_expert_parallel_equals_single_process_torch():
    run_distributed(_worker, world_size=2, args=("torch",), timeout_s=90)


@pytest.mark.world_size(2)
@pytest.mark.skipif(not tutel_available(), reason="Tutel is not installed")
def test_expert_parallel_equals_single_process_tutel():
    run_distributed(_worker, world_size=2, args=("tutel",), timeout_s=90)


def _hanging_worker(rank, world):
    if rank == 0:  # rank 1 never joins: a real hang, which the harness must kill
        dist.all_reduce(torch.ones(1))


@pytest.mark.world_size(2)
def test_a_hang_is_killed_and_reported():
    with pytest.raises(TimeoutError, match="did not finish"):
        run_distributed(_hanging_worker, world_size=2, timeout_s=5)
