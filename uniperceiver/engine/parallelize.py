"""Expert parallelism for the trainer: the device mesh and the expert shards on it.

THE CONTRACT (shared with engine/fsdp.py and engine/dcp.py):

- `build_device_mesh(world_size, ep_size, device_type)` is the ONE place the mesh is built:
  a 2-D `DeviceMesh` of shape (world_size // ep_size, ep_size) with mesh_dim_names
  ("dp", "ep"). Ranks [i*ep, (i+1)*ep) form one "ep" group (they split the experts between
  them); ranks with the same rank % ep form one "dp" group (they hold the same expert shard
  and reduce its gradient). ep_size=1 gives shape (world, 1): every expert replicated.
- `shard_experts(model, mesh)` turns every stacked expert parameter (`weight_EOI`, `bias_EO`
  of each `moe.MoELinear`, found with `moe.parallel.expert_parameters`) into an
  `nn.Parameter` holding a DTensor with placement `[Shard(0)]` on `mesh["ep"]` over the GLOBAL
  shape [E, ...]. The local tensor is this rank's E/ep experts, global ids
  [ep_rank*E/ep, (ep_rank+1)*E/ep). So `model.state_dict()` holds DTensors for the experts and
  torch.distributed.checkpoint reshards them to any other EP size for free; optimizer states of
  these parameters are DTensors on the same mesh too. The MoE layers compute with
  `param.to_local()` (moe.parallel.local_shard) and exchange tokens / expert weights over
  `mesh["ep"].get_group()`.
- Non-expert parameters stay plain tensors, replicated over all ranks: DDP (world group) or
  FSDP2 (`fully_shard` over the whole mesh flattened, or `mesh["dp"]` when composing with EP as
  torchtitan does) owns them. DDP must skip the expert parameters
  (`moe.parallel.ddp_ignored_parameter_names`, which `wrap_ddp` below applies).
- After backward, `finish_expert_gradients(model, mesh)` must run (before clipping): it gives
  every expert parameter without a gradient a zero one (never stale, and every rank joins the
  same collectives), sums the shard gradients over `mesh["dp"]` and divides by the world size
  (the mean DDP takes for the rest).
- `clip_grad_norm(params, max_norm, mesh)` clips over the mixed set (plain + DTensor grads):
  the norm counts every expert once (shards summed over "ep"), the same number on every rank.

- Single-file checkpoints of an EP run hold the replicated layout (`full_model_state_dict`,
  `full_optimizer_state_dict`: experts and their AdamW moments all-gathered), so they load into
  any EP size (`load_full_model_state_dict`, `load_full_optimizer_state_dict` slice the rows).
  A DCP checkpoint can instead save `model.state_dict()` / the optimizer state as they are
  (DTensors) and let DCP reshard.
- The optimizer runs with foreach=False under EP or FSDP (foreach kernels take one tensor type per
  call; FSDP keeps the 0-d temperatures as plain tensors).
- Evaluation never runs on the sharded model: checkpoints hold every expert, and eval loads them
  replicated, so no expert collective can hang there.

With ep_size == 1 nothing here changes the model: the trainer behaves as before.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from moe import Decision, MoELinear, SegmentDecision
from moe.parallel import ExpertParallel, ddp_ignored_parameter_names, expert_modules, expert_parameters

from ..config import ConfigError
from .optim import clips

__all__ = [
    "build_device_mesh",
    "check_expert_parallel_size",
    "clip_grad_norm",
    "exchange_bytes",
    "finish_expert_gradients",
    "full_model_state_dict",
    "full_optimizer_state_dict",
    "load_full_model_state_dict",
    "load_full_optimizer_state_dict",
    "shard_experts",
    "wrap_ddp",
]


def check_expert_parallel_size(world_size: int, ep_size: int, num_experts: int | None) -> None:
    """ConfigError (exit code 2 in train) naming `train.expert_parallel_size` unless it divides the world and E."""
    if ep_size < 1:
        raise ConfigError(f"train.expert_parallel_size must be >= 1, got {ep_size}")
    if world_size % ep_size:
        raise ConfigError(
            f"train.expert_parallel_size={ep_size} must divide the world size {world_size}"
        )
    if ep_size > 1:
        if num_experts is None:
            raise ConfigError(
                f"train.expert_parallel_size={ep_size} needs an MoE model (model.moe.enabled=true)"
            )
        if num_experts % ep_size:
            raise ConfigError(
                f"train.expert_parallel_size={ep_size} must divide "
                f"model.moe.routing.num_experts={num_experts}"
            )


def build_device_mesh(world_size: int, ep_size: int, device_type: str) -> DeviceMesh:
    """The ("dp", "ep") mesh of shape (world_size // ep_size, ep_size); collective (every rank
    calls it). Needs an initialised default process group of `world_size` ranks."""
    if ep_size < 1 or world_size % ep_size:
        raise ConfigError(f"train.expert_parallel_size={ep_size} must divide the world size {world_size}")
    if dist.is_initialized() and dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} but the process group has {dist.get_world_size()} ranks")
    return init_device_mesh(device_type, (world_size // ep_size, ep_size), mesh_dim_names=("dp", "ep"))


def shard_experts(model: nn.Module, mesh: DeviceMesh) -> None:
    """Keep this rank's E/ep experts of every MoE layer as DTensor Shard(0) parameters.

    The model must hold ALL experts (built the same way on every rank, so the shards of a
    seeded run are slices of the replicated run's experts).
    """
    ep_mesh = mesh["ep"]
    ep_size, ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
    if ep_size == 1:
        return
    group = ep_mesh.get_group()
    for _, module in list(expert_modules(model)):
        ep = module.expert_parallel
        if ep.sharded:
            raise ValueError("shard_experts: the model's experts are already sharded")
        placement = ExpertParallel(group, ep_size, ep_rank, ep.num_experts)
        placement = ExpertParallel.from_group(placement, ep.num_experts)  # validates E % ep
        first, count = placement.first_expert, placement.num_local
        for pname in module.EXPERT_PARAMS:
            param = getattr(module, pname, None)
            if param is None:
                continue
            local = param.detach()[first : first + count].clone()
            sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            setattr(module, pname, nn.Parameter(sharded, requires_grad=param.requires_grad))
        module.expert_parallel = placement


def wrap_ddp(module: nn.Module, device_ids=None) -> nn.Module:
    """DDP over the non-expert parameters of `module` (its sharded expert parameters are
    reduced by `finish_expert_gradients` instead)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignored = ddp_ignored_parameter_names(module)
    if ignored:
        DDP._set_params_and_buffers_to_ignore_for_model(module, ignored)
    return DDP(module, device_ids=device_ids, find_unused_parameters=True)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def finish_expert_gradients(model: nn.Module, mesh: DeviceMesh | None) -> None:
    """Zero-fill missing expert gradients, sum shards over "dp", divide by the world size."""
    params = [p for _, p in expert_parameters(model)]
    if not params or mesh is None:
        return
    world = mesh.size()
    dp_group = mesh["dp"].get_group() if mesh["dp"].size() > 1 else None
    for param in params:
        if param.grad is None:
            # No rank routed to this layer's experts (or this rank's task skipped it): a zero
            # gradient, so AdamW decays it as the replicated run does and no rank skips the
            # collectives below.
            param.grad = torch.zeros_like(param)
        grad = _local(param.grad)
        if dp_group is not None:
            dist.all_reduce(grad, group=dp_group)
        grad.div_(world)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float, mesh: DeviceMesh | None) -> Tensor:
    """Total 2-norm of all gradients (expert shards summed over "ep"), clipped to max_norm like
    torch.nn.utils.clip_grad_norm_; returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    plain = [p.grad for p in params if not isinstance(p.grad, DTensor)]
    sharded = [p.grad.to_local() for p in params if isinstance(p.grad, DTensor)]
    device = params[0].grad.device if params else torch.device("cpu")
    plain_sq = torch.stack([g.detach().float().pow(2).sum() for g in plain]).sum() if plain else torch.zeros((), device=device)
    shard_sq = torch.stack([g.detach().float().pow(2).sum() for g in sharded]).sum() if sharded else torch.zeros((), device=device)
    if sharded and mesh is not None and mesh["ep"].size() > 1:
        dist.all_reduce(shard_sq, group=mesh["ep"].get_group())
    total = (plain_sq + shard_sq).sqrt()
    if math.isfinite(max_norm) and clips(max_norm, total):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in plain + sharded:
            g.mul_(coef.to(g.dtype))
    return total


def full_model_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with every expert shard all-gathered to its global [E, ...]
    tensor (collective: every rank of the mesh calls it)."""
    out = {}
    for name, t in model.state_dict().items():
        out[name] = t.full_tensor() if isinstance(t, DTensor) else t
    return out


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with every DTensor state (the expert shards' moments)
    all-gathered: the same layout a replicated run writes (collective)."""
    state = optimizer.state_dict()
    state["state"] = {
        pid: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in entry.items()}
        for pid, entry in state["state"].items()
    }
    return state


def load_full_model_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full (replicated-layout) state dict; expert shards take their rows. Keys and
    shapes must already match (see modeling.model.load_state_dict_strict)."""
    own = model.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            target = own[name]
            if isinstance(target, DTensor):
                target.to_local().copy_(_shard_rows(value, target))
            else:
                target.copy_(value)


def load_full_optimizer_state_dict(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer state written in the replicated layout (by a run of any EP size);
    states of DTensor parameters become DTensor shards like their parameter."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, DTensor):
                continue
            entry = optimizer.state.get(param, {})
            for k, v in list(entry.items()):
                if isinstance(v, Tensor) and not isinstance(v, DTensor) and tuple(v.shape) == tuple(param.shape):
                    entry[k] = DTensor.from_local(_shard_rows(v, param).to(param.dtype).clone(), param.device_mesh,
                                                  param.placements, run_check=False)


def _shard_rows(full: Tensor, like: DTensor) -> Tensor:
    """This rank's Shard(0) rows of a full tensor."""
    local = like.to_local()
    rank = like.device_mesh.get_local_rank()
    return full[rank * local.shape[0] : (rank + 1) * local.shape[0]].to(local.device)


def exchange_bytes(
    model: nn.Module, decisions: list[tuple[str, Decision]], segment_tokens: list[int], ep_size: int, ep_rank: int = 0
) -> dict[str, dict[str, int]]:
    """Bytes one rank receives per step (forward; backward sends as many back) to run its MoE
    sublayers under expert parallelism of size `ep_size`, for both strategies, per routed
    sublayer (keyed by decision name) and in total ("total"):

    - "expert_fetch": the rows of the experts its decisions chose that another rank owns
      (weights + biases of every linear using the decision), what merged routers move;
    - "token_all_to_all": its token slots whose expert another rank owns, sent there and the
      outputs sent back (in + out features), what token dispatch moves.

    `decisions` are a joint encoder call's (`TrainStep` output), `segment_tokens` the tokens of
    each routing segment of that call (`JointEncoding.segment_tokens`; only used for segment
    decisions). Pure arithmetic, no collectives: call it on any rank or offline.
    """
    encoder = model.encoder if hasattr(model, "encoder") else model
    out: dict[str, dict[str, int]] = {}
    total = {"expert_fetch": 0, "token_all_to_all": 0}
    for name, decision in decisions:
        layer_name, sub = name.rsplit(".", 1)
        layer = encoder.get_submodule(layer_name)
        sibling = {"qkv": "attn_out", "fc1": "fc2"}[sub]
        linears = [getattr(layer, sub)] + ([getattr(layer, sibling)] if layer.share_decisions else [])
        linears = [m for m in linears if isinstance(m, MoELinear)]
        num_experts = linears[0].cfg.num_experts
        per_owner = num_experts // ep_size
        ids_NK = decision.expert_ids_NK.detach().cpu()
        if isinstance(decision, SegmentDecision):
            tokens_N = torch.tensor(segment_tokens, dtype=torch.int64)
        else:
            tokens_N = torch.ones(ids_NK.shape[0], dtype=torch.int64)
        remote_NK = (ids_NK // per_owner) != ep_rank
        remote_slots = int((tokens_N[:, None] * remote_NK).sum())
        remote_experts = {int(e) for e in ids_NK[remote_NK].unique()}
        fetch = tokens = 0
        for m in linears:
            elem = m.weight_EOI.element_size()
            fetch += len(remote_experts) * (m.out_features * m.in_features + (m.out_features if m.bias_EO is not None else 0)) * elem
            tokens += remote_slots * (m.in_features + m.out_features) * elem
        out[name] = {"expert_fetch": fetch, "token_all_to_all": tokens}
        total["expert_fetch"] += fetch
        total["token_all_to_all"] += tokens
    out["total"] = total
    return out
