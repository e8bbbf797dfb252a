"""Expert parallelism: experts sharded over a process group, tokens exchanged with all-to-all.

Shape legend: P expert-parallel ranks, E global experts, El = E / P local experts per rank,
M rows (token slots) on this rank, R rows received from all ranks, I/O feature widths.

Rank r owns global experts [r*El, (r+1)*El). Token dispatch sends every kept slot to the rank
owning its expert with a variable-size all-to-all: ranks first exchange their per-expert counts,
so ranks with different token counts (or different tasks, hence different routing) never wait on
each other's shapes; there is no padding to agree on. Merged (data-independent) routing instead
moves the experts, not the tokens: a rank fetches only the experts its own segments chose
(top-k of E) from their owners, merges them locally, and returns their gradients to the owners.

Every rank of the group must call each MoE sublayer the same number of times per step (the
collectives, all-to-all for token routing and the expert fetch for merged routing, are matched
by order). A shared model definition is not enough where ranks run different numbers of forward
passes in a step; Uni-Perceiver's trainer therefore encodes everything of a micro-step in ONE
encoder call (uniperceiver/modeling/encoder.py, `Encoder.forward_groups`).

Gradients of expert parameters: after backward, the owner holds sum over EP ranks of their
contributions. DDP must skip these parameters (`ddp_ignored_parameter_names`); reduce them over
the ranks holding the same shard with `reduce_expert_gradients`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .experts import ExpertFn

ProcessGroup = dist.ProcessGroup


@dataclass(frozen=True)
class ExpertParallel:
    """This rank's place in an expert-parallel group (size 1 = every expert local)."""

    group: ProcessGroup | None
    size: int
    rank: int
    num_experts: int

    @classmethod
    def from_group(cls, group: ProcessGroup | ExpertParallel | None, num_experts: int) -> ExpertParallel:
        """`group` may also be an `ExpertParallel` (with group None: a "virtual" shard, used to
        build one rank's model offline; it cannot run forward)."""
        if isinstance(group, ExpertParallel):
            if group.num_experts != num_experts:
                raise ValueError(f"ExpertParallel has num_experts={group.num_experts}, layer {num_experts}")
            if num_experts % group.size != 0 or not 0 <= group.rank < group.size:
                raise ValueError(f"invalid expert-parallel placement {group}")
            return group
        if group is None:
            return cls(None, 1, 0, num_experts)
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if num_experts % size != 0:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by the expert-parallel size {size}"
            )
        return cls(group, size, rank, num_experts)

    def __deepcopy__(self, memo) -> ExpertParallel:
        return self  # immutable; a process group cannot (and need not) be copied (EMA models)

    @property
    def enabled(self) -> bool:
        if self.size > 1 and self.group is None:
            raise RuntimeError("a virtual expert-parallel shard (no process group) cannot run")
        return self.size > 1

    @property
    def sharded(self) -> bool:
        return self.size > 1

    @property
    def num_local(self) -> int:
        return self.num_experts // self.size

    @property
    def first_expert(self) -> int:
        return self.rank * self.num_local

    def global_ids(self) -> list[int]:
        return list(range(self.first_expert, self.first_expert + self.num_local))

    def max_over_group(self, value: int) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_comm_device(self.group))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())


def _comm_device(group: ProcessGroup | None) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


class _AllToAll(torch.autograd.Function):
    """Variable-size all-to-all on rows; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x_MI: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x_MI.new_empty((sum(out_splits),) + tuple(x_MI.shape[1:]))
        dist.all_to_all_single(out, x_MI.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad_out.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def all_to_all_rows(x_MI: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    return _AllToAll.apply(x_MI, out_splits, in_splits, group)


def exchange_counts(counts: list[int], ep: ExpertParallel, device: torch.device) -> Tensor:
    """recv_PL[src, le]: rows rank `src` sends to this rank's local expert `le`."""
    send = torch.tensor(counts, dtype=torch.int64, device=device).view(ep.size, ep.num_local)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=ep.group)
    return recv


def _block_permutation(counts_AB: Tensor) -> Tensor:
    """Row order that turns blocks laid out [a][b] into [b][a] (block sizes counts_AB)."""
    a, b = counts_AB.shape
    starts = (torch.cumsum(counts_AB.reshape(-1), 0) - counts_AB.reshape(-1)).view(a, b)
    pieces = [
        torch.arange(int(starts[i, j]), int(starts[i, j] + counts_AB[i, j]))
        for j in range(b)
        for i in range(a)
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)


def run_experts_parallel(x_MI: Tensor, counts: list[int], ep: ExpertParallel, expert_fn: ExpertFn) -> Tensor:
    """Send rows (grouped by global expert) to their owners, run the local experts, send back."""
    device = x_MI.device
    recv_PL = exchange_counts(counts, ep, _comm_device(ep.group)).cpu()
    send_P = torch.tensor(counts).view(ep.size, ep.num_local).sum(1).tolist()
    recv_P = recv_PL.sum(1).tolist()
    x_RI = all_to_all_rows(x_MI, recv_P, send_P, ep.group)
    # Received rows are [source rank][local expert]; experts want [local expert][source rank].
    to_expert_R = _block_permutation(recv_PL).to(device)
    y_RO = expert_fn(x_RI.index_select(0, to_expert_R), recv_PL.sum(0).tolist())
    back_R = torch.empty_like(to_expert_R)
    back_R[to_expert_R] = torch.arange(to_expert_R.numel(), device=device)
    y_RO = y_RO.index_select(0, back_R)
    return all_to_all_rows(y_RO, send_P, recv_P, ep.group)


def local_shard(param: Tensor) -> Tensor:
    """The local rows of an expert parameter: a DTensor's local shard (differentiable), or the
    tensor itself (this module does not import DTensor to keep plain tensors the fast path)."""
    to_local = getattr(type(param), "to_local", None)
    return param.to_local() if to_local is not None else param


def _request_matrix(needed: list[int], ep: ExpertParallel, device: torch.device) -> Tensor:
    """want_PE[p, e] = 1 when rank p needs global expert e (all-gathered; E small ints)."""
    want_E = torch.zeros(ep.num_experts, dtype=torch.int64, device=device)
    if needed:
        want_E[torch.tensor(needed, device=device)] = 1
    parts = [torch.empty_like(want_E) for _ in range(ep.size)]
    dist.all_gather(parts, want_E, group=ep.group)
    return torch.stack(parts).cpu()


class _FetchExperts(torch.autograd.Function):
    """Rows of the experts `needed` (sorted global ids) from their owners -> [U, ...].

    Forward: every rank announces the experts it needs, each owner sends exactly those rows
    (variable-size all-to-all, rows grouped by destination). Backward sends each fetched row's
    gradient back to its owner, which sums the requesters' contributions into its local
    gradient; local experts nobody fetched get zeros.
    """

    @staticmethod
    def forward(ctx, local_EX: Tensor, ep: ExpertParallel, needed: list[int]) -> Tensor:
        comm = _comm_device(ep.group)
        want_PE = _request_matrix(needed, ep, comm)
        lo, hi = ep.first_expert, ep.first_expert + ep.num_local
        # Local rows each rank asked me for, destination-major; rows I receive, owner-major
        # (= ascending global id, since owners hold contiguous ranges).
        send_rows = [torch.nonzero(want_PE[p, lo:hi]).flatten() for p in range(ep.size)]
        send_P = [len(r) for r in send_rows]
        recv_P = [int(want_PE[ep.rank, q * ep.num_local : (q + 1) * ep.num_local].sum()) for q in range(ep.size)]
        send_index = torch.cat(send_rows).to(local_EX.device)
        flat_EX = local_EX.reshape(local_EX.shape[0], -1)
        out_UX = flat_EX.new_empty((sum(recv_P), flat_EX.shape[1]))
        dist.all_to_all_single(out_UX, flat_EX.index_select(0, send_index).contiguous(), recv_P, send_P, group=ep.group)
        ctx.ep, ctx.splits, ctx.send_index, ctx.local_shape = ep, (send_P, recv_P), send_index, local_EX.shape
        return out_UX.view((len(needed),) + tuple(local_EX.shape[1:]))

    @staticmethod
    def backward(ctx, grad_UX: Tensor):
        send_P, recv_P = ctx.splits
        flat_UX = grad_UX.reshape(grad_UX.shape[0], -1).contiguous()
        back_RX = flat_UX.new_empty((sum(send_P), flat_UX.shape[1]))
        dist.all_to_all_single(back_RX, flat_UX, send_P, recv_P, group=ctx.ep.group)
        grad_EX = flat_UX.new_zeros((ctx.local_shape[0], flat_UX.shape[1]))
        grad_EX.index_add_(0, ctx.send_index, back_RX)
        return grad_EX.view(ctx.local_shape), None, None


def fetch_experts(local_EX: Tensor, ep: ExpertParallel, needed: list[int]) -> Tensor:
    """Experts `needed` (sorted global ids) as [len(needed), ...], fetched from their owners."""
    if not ep.enabled:
        return local_EX[needed]
    return _FetchExperts.apply(local_EX, ep, needed)


def expert_fetch_bytes(needed_per_rank: list[list[int]], ep_size: int, num_experts: int, row_bytes: int) -> int:
    """Bytes crossing ranks (forward; the gradients return the same amount) when every rank
    fetches the experts it needs: rows whose owner is another rank."""
    per_owner = num_experts // ep_size
    return sum(row_bytes for r, needed in enumerate(needed_per_rank) for e in needed if e // per_owner != r)


def token_exchange_bytes(counts_per_rank: list[list[int]], ep_size: int, in_bytes: int, out_bytes: int) -> int:
    """Bytes crossing ranks (forward) when rank r sends counts_per_rank[r][e] token slots to
    expert e's owner and gets the outputs back (in_bytes per row out, out_bytes per row back)."""
    num_experts = len(counts_per_rank[0])
    per_owner = num_experts // ep_size
    return sum((in_bytes + out_bytes) * c for r, counts in enumerate(counts_per_rank)
               for e, c in enumerate(counts) if e // per_owner != r)


# --- data-parallel helpers --------------------------------------------------------------------


def expert_modules(model: nn.Module):
    """(name, module) of every module holding stacked expert parameters."""
    for name, module in model.named_modules():
        if hasattr(module, "expert_parallel") and hasattr(module, "EXPERT_PARAMS"):
            yield name, module


def expert_parameters(model: nn.Module, sharded_only: bool = True) -> list[tuple[str, nn.Parameter]]:
    """Fully qualified (name, parameter) of expert parameters (only sharded ones by default)."""
    out = []
    for prefix, module in expert_modules(model):
        if sharded_only and not module.expert_parallel.sharded:
            continue
        for pname in module.EXPERT_PARAMS:
            param = getattr(module, pname, None)
            if param is not None:
                out.append((f"{prefix}.{pname}" if prefix else pname, param))
    return out


def ddp_ignored_parameter_names(model: nn.Module) -> list[str]:
    """Names to hand DDP before wrapping, so it skips the expert-parallel parameters:
    `DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)`."""
    return [name for name, _ in expert_parameters(model)]


def reduce_expert_gradients(model: nn.Module, expert_dp_group: ProcessGroup | None, world_size: int) -> None:
    """Average sharded expert gradients like DDP averages the rest.

    The owner already holds the sum over its expert-parallel group; sum over the ranks that
    hold the same shard (`expert_dp_group`, None when there is only one such rank) and divide
    by the data-parallel world size, as DDP's mean over ranks would.
    """
    for _, param in expert_parameters(model):
        if param.grad is None:
            continue
        if expert_dp_group is not None and dist.get_world_size(expert_dp_group) > 1:
            dist.all_reduce(param.grad, group=expert_dp_group)
        param.grad.div_(world_size)


def new_expert_parallel_groups(ep_size: int) -> tuple[ProcessGroup | None, ProcessGroup | None]:
    """(expert-parallel group, expert-data-parallel group) of this rank; collective.

    Ranks [i*ep_size, (i+1)*ep_size) share experts; ranks with the same rank % ep_size hold the
    same shard. Every rank must call this (new_group is collective).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size != 0:
        raise ValueError(f"world size {world} is not divisible by ep_size={ep_size}")
    ep_group = dp_group = None
    for i in range(world // ep_size):
        ranks = list(range(i * ep_size, (i + 1) * ep_size))
        g = dist.new_group(ranks)
        if rank in ranks:
            ep_group = g
    for j in range(ep_size):
        ranks = list(range(j, world, ep_size))
        g = dist.new_group(ranks)
        if rank in ranks:
            dp_group = g
    return (ep_group if ep_size > 1 else None), (dp_group if world // ep_size > 1 else None)
