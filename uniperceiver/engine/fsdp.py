"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the parameters expert parallelism does not own.

Composition follows torchtitan: expert parallelism places the expert weights first (DTensors
sharded on the "ep" mesh dim); FSDP then shards every other parameter over all ranks and leaves
those DTensors alone (their gradients are reduced over the ranks holding the same shard by the
expert-parallel code). Without expert parallelism the experts are ordinary parameters and FSDP
shards them like the rest.

Wrapping granularity. FSDP all-gathers a group's parameters in the group module's forward and
reduce-scatters its gradients in that module's backward; those collectives are matched by
order across ranks. One group per encoder layer is only safe when every rank calls each layer
the same number of times per micro-step (the one-call encoder). While ranks run different
numbers of encoder passes (unmixed task sampling: a retrieval rank encodes two sequence sets, a
classification rank one), the whole model is one group on the root: one all-gather per forward
and one reduce-scatter per backward whatever the task, at the cost of holding the full
parameters during the step (gradients and optimizer states stay sharded).

Parity with DDP: a parameter unused on one rank but used on another contributes zeros to the
mean (`set_reduce_scatter_unused_params`), as under DDP; a parameter no rank used keeps grad None
(`drop_globally_unused_grads`), so AdamW skips it exactly as it does under DDP.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .optim import clips


def mixed_precision_policy(amp: str, device_type: str) -> MixedPrecisionPolicy:
    """bf16 on GPU: parameters all-gathered and computed in bf16, gradients reduced in fp32
    (torchtitan's default). Elsewhere no casting (autocast, if on, still picks op precisions)."""
    if amp == "bf16" and device_type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def world_mesh(device_type: str) -> DeviceMesh:
    """A 1-D mesh over every rank: the mesh FSDP shards the non-expert parameters on."""
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("fsdp",))


def placed_parameters(module: nn.Module) -> set[nn.Parameter]:
    """Parameters already distributed by another parallelism (expert-parallel DTensors)."""
    return {p for p in module.parameters() if isinstance(p, DTensor)}


def replicated_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters FSDP cannot shard, kept whole on every rank: the 0-d temperatures (reshaping
    them would change the checkpoint format). Their gradients: `reduce_replicated_grads`."""
    return [p for p in module.parameters() if p.ndim == 0 and not isinstance(p, DTensor)]


def reduce_replicated_grads(params: list[nn.Parameter]) -> None:
    """Average the replicated parameters' gradients over all ranks as DDP does: a rank without
    a gradient contributes zero; a parameter no rank used keeps grad None. One all-reduce."""
    if not params or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    device = params[0].device
    values = torch.stack([p.grad.detach().float().reshape(()) if p.grad is not None else torch.zeros((), device=device)
                          for p in params])
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    buf = torch.cat([values, used])
    dist.all_reduce(buf)
    n, world = len(params), dist.get_world_size()
    for i, p in enumerate(params):
        p.grad = None if buf[n + i] == 0 else (buf[i] / world).to(p.dtype).reshape(p.shape)


def apply_fsdp(
    root: nn.Module,
    layers: Iterable[nn.Module],
    mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy,
    per_layer: bool,
) -> FSDPModule:
    """Shard `root` in place. `layers` (the encoder layers) get a group each when `per_layer`
    (every rank calls each of them equally often per micro-step); `root` holds the rest and is
    the module whose forward must be called (FSDP's root hooks run there)."""
    ignored = placed_parameters(root) | set(replicated_parameters(root))
    if per_layer:
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp_policy, ignored_params=ignored or None)
    # The root group is needed right at the start of backward: keep it unsharded after forward.
    fully_shard(root, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False, ignored_params=ignored or None)
    assert isinstance(root, FSDPModule)
    # A task-specific parameter (a temperature) unused on this rank but used on another must
    # still join the reduce-scatter, with zeros, or the ranks' collectives differ in size.
    root.set_reduce_scatter_unused_params(True)
    return root


def wrap_train_step(step_module: nn.Module, model: nn.Module, device_type: str, amp: str) -> FSDPModule:
    """The trainer's FSDP setup: `step_module` (model + loss, whose forward the trainer calls)
    becomes the FSDP root over all ranks."""
    # One group per encoder layer needs the one-call encoder (see the module docstring); the
    # encoder says whether it runs every layer exactly once per micro-step.
    per_layer = bool(getattr(model.encoder, "one_call_per_step", False))
    return apply_fsdp(step_module, model.encoder.layers, world_mesh(device_type),
                      mixed_precision_policy(amp, device_type), per_layer)


def fsdp_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters FSDP manages (DTensors on the "fsdp" mesh), not the expert-parallel ones
    nor the replicated 0-d ones."""
    return [p for p in model.parameters()
            if isinstance(p, DTensor) and "fsdp" in (p.device_mesh.mesh_dim_names or ())]


def set_gradient_sync(root: nn.Module, sync: bool) -> None:
    """Gradient accumulation: reduce-scatter only on the last micro-batch (DDP's no_sync)."""
    if isinstance(root, FSDPModule):
        root.set_requires_gradient_sync(sync)


def drop_globally_unused_grads(params: Iterable[nn.Parameter]) -> None:
    """Set grad None where every rank's gradient is exactly zero: FSDP reduce-scatters zeros
    for parameters no rank used, DDP leaves them None (and AdamW skips None, not zero).

    One small all-reduce (a flag per sharded parameter) over the world."""
    sharded = [p for p in params if isinstance(p.grad, DTensor)]
    if not sharded:
        return
    flags = torch.stack([p.grad.to_local().ne(0).any() for p in sharded]).to(torch.int32)
    mesh = sharded[0].grad.device_mesh
    if dist.get_world_size() > 1:
        flags = flags.to(mesh.device_type)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    for p, used in zip(sharded, flags.tolist(), strict=True):
        if not used:
            p.grad = None


@torch.no_grad()
def clip_grad_norm_(params: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Global L2 norm of all gradients (plain tensors and DTensors on any meshes) and scale them
    down to `max_norm` (inf = report only). The norm of each group of DTensors with the same
    mesh and placements is reduced by DTensor itself (sums over sharded dims only); the groups
    are then combined, so expert shards and FSDP shards count once each."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    groups: dict[object, list[Tensor]] = defaultdict(list)
    for g in grads:
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else ("local", g.device)
        groups[key].append(g)
    squares = []
    for members in groups.values():
        norm = torch.nn.utils.get_total_norm(members, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float().square().cpu())
    total = torch.stack(squares).sum().sqrt()
    if max_norm != float("inf") and clips(max_norm, total):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            local = g.to_local() if isinstance(g, DTensor) else g
            local.mul_(coef.to(local.device, local.dtype))
    return total
