"""Expert computation on row blocks: rows of expert e are the e-th block of sizes `counts`.

Shape legend: M rows (kept token slots, grouped by expert), I in features, O out features,
D model width, F hidden width, E experts (local ones under expert parallelism).

Experts are stacked parameters (weight_EOI, bias_EO). `grouped_linear` is a hand-written
autograd Function: indexing experts one by one under autograd (`weight_EOI[e]`) would allocate a
full E x O x I zero gradient per expert, and split/unbind would copy every gradient once more
(cat/stack); on CPU those copies cost as much as the routing itself.
"""
from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import linear_into, linear_new
from .memory import empty_like_large

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}

# grad <- grad * d act(h) / dh, in place: each activation's backward on one block, no graph.
ACTIVATION_BACKWARDS_: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gelu": lambda grad, h: torch.ops.aten.gelu_backward.grad_input(grad, h, grad_input=grad),
    "relu": lambda grad, h: torch.ops.aten.threshold_backward.grad_input(grad, h, 0, grad_input=grad),
    "silu": lambda grad, h: torch.ops.aten.silu_backward.grad_input(grad, h, grad_input=grad),
}

ExpertFn = Callable[[Tensor, Sequence[int]], Tensor]


def _check_counts(counts: Sequence[int], num_experts: int, rows: int) -> list[int]:
    counts = [int(c) for c in counts]
    if len(counts) != num_experts or sum(counts) != rows:
        raise ValueError(f"row blocks {counts} do not fit {rows} rows of {num_experts} experts")
    return counts


def _partition(costs: list[int], parts: int) -> list[list[int]]:
    """Greedy longest-first split of jobs (by cost) into `parts` groups of similar total cost."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for j in sorted(range(len(costs)), key=lambda j: -costs[j]):
        g = loads.index(min(loads))
        groups[g].append(j)
        loads[g] += costs[j]
    return [g for g in groups if g]


def _run_expert_jobs(jobs: list[Callable[[], None]], costs: list[int], on_cpu: bool) -> None:
    """Run one job per expert; on a multi-threaded CPU, run experts side by side instead.

    A matmul on a block of a few hundred rows scales poorly over threads (the threads split an
    already small problem and synchronise per call), while experts are independent: giving each
    of the n intra-op threads its own experts, each computed single-threaded, recovers the dense
    layer's efficiency. Small jobs stay on the calling thread: below ~1 ms each, the hand-off
    and the GIL cost more than they save. MOE_EXPERT_THREADS=0 turns this off (e.g. when the
    caller runs other CPU work concurrently).
    """
    threads = torch.get_num_threads() if on_cpu else 1
    if (
        threads <= 1
        or len(jobs) < 2
        or sum(costs) < _PARALLEL_MIN_JOB_COST * len(jobs)
        or os.environ.get("MOE_EXPERT_THREADS", "1") == "0"
    ):
        for job in jobs:
            job()
        return
    groups = _partition(costs, min(threads, len(jobs)))

    def run(group: list[int]) -> None:
        torch.set_num_threads(1)  # this worker thread's own setting (the caller's is untouched)
        with torch.no_grad():  # grad mode is per thread; these are autograd Function internals
            for j in group:
                jobs[j]()

    futures = [_expert_workers(threads).submit(run, g) for g in groups]
    for f in futures:
        f.exception()  # wait for all before re-raising anything
    for f in futures:
        f.result()


_PARALLEL_MIN_JOB_COST = 1 << 25  # mean multiply-adds per expert job (~1 ms on one core)


@functools.cache
def _expert_workers(threads: int) -> ThreadPoolExecutor:
    """`threads` long-lived single-threaded workers for expert jobs (one pool per thread count).

    A process-wide resource like torch's own intra-op pool, not state: results never depend on
    it. Workers are started once (a pool per call costs ~0.3 ms); each job sets its worker's
    torch thread count to 1 (a per-thread setting), so the caller's setting is never touched.
    Forked children start without it (see below).
    """
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moe-experts")


if hasattr(os, "register_at_fork"):  # a forked child (e.g. a DataLoader worker) has no worker threads
    os.register_at_fork(after_in_child=_expert_workers.cache_clear)


class _GroupedLinear(torch.autograd.Function):
    """y[block e] = x[block e] W_e^T + b_e, forward and backward written block by block.

    Every output and every gradient is ONE allocation that the per-expert matmuls write into
    (`out=` row blocks / expert slices): no per-expert temporaries, no cat/stack copies, and
    the E x O x I weight gradient is written exactly once. Experts with no rows get zeros.
    """

    @staticmethod
    def forward(ctx, x_MI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, counts: list[int]) -> Tensor:
        y_MO = x_MI.new_empty(x_MI.shape[0], weight_EOI.shape[1])
        starts = _starts(counts)
        out_in = weight_EOI.shape[1] * weight_EOI.shape[2]

        def job(e: int) -> Callable[[], None]:
            rows = slice(starts[e], starts[e] + counts[e])
            bias_O = None if bias_EO is None else bias_EO[e]
            return lambda: linear_into(x_MI[rows], weight_EOI[e], bias_O, y_MO[rows])

        active = [e for e, c in enumerate(counts) if c]
        _run_expert_jobs([job(e) for e in active], [counts[e] * out_in for e in active], x_MI.device.type == "cpu")
        ctx.counts, ctx.has_bias = counts, bias_EO is not None
        ctx.save_for_backward(x_MI, weight_EOI)
        return y_MO

    @staticmethod
    def backward(ctx, grad_MO: Tensor):
        x_MI, weight_EOI = ctx.saved_tensors
        grad_MO = grad_MO.contiguous()
        counts = ctx.counts
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = x_MI.new_empty(x_MI.shape) if need_x else None
        grad_w = empty_like_large(weight_EOI, zero=0 in counts) if need_w else None
        grad_b = weight_EOI.new_empty(weight_EOI.shape[:2]) if need_b and ctx.has_bias else None
        starts = _starts(counts)

        def job(e: int) -> Callable[[], None]:
            rows = slice(starts[e], starts[e] + counts[e])

            def run() -> None:
                if counts[e] == 0:  # grad_w was allocated zeroed
                    if grad_b is not None:
                        grad_b[e].zero_()
                    return
                g_cO = grad_MO[rows]
                if grad_x is not None:
                    linear_into(g_cO, weight_EOI[e].t(), None, grad_x[rows])
                if grad_w is not None:
                    torch.mm(g_cO.t(), x_MI[rows], out=grad_w[e])
                if grad_b is not None:
                    torch.sum(g_cO, dim=0, out=grad_b[e])

            return run

        out_in = weight_EOI.shape[1] * weight_EOI.shape[2]
        costs = [max(c, 1) * out_in * 2 for c in counts]
        _run_expert_jobs([job(e) for e in range(len(counts))], costs, x_MI.device.type == "cpu")
        return grad_x, grad_w, grad_b, None


def _starts(counts: list[int]) -> list[int]:
    starts, acc = [], 0
    for c in counts:
        starts.append(acc)
        acc += c
    return starts


def grouped_linear(
    x_MI: Tensor,
    weight_EOI: Tensor,
    bias_EO: Tensor | None,
    counts: Sequence[int],
    out_slice: slice | None = None,
) -> Tensor:
    """y[block e] = x[block e] W_e^T + b_e (only output rows `out_slice` when given)."""
    if out_slice is not None:
        weight_EOI = weight_EOI[:, out_slice]
        bias_EO = None if bias_EO is None else bias_EO[:, out_slice]
    counts = _check_counts(counts, weight_EOI.shape[0], x_MI.shape[0])
    device_type = x_MI.device.type
    # Under autocast, compute in the autocast dtype as F.linear would; otherwise dtypes must match.
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_MI.dtype
    x_MI, weight_EOI = x_MI.to(dtype), weight_EOI.to(dtype)
    bias_EO = None if bias_EO is None else bias_EO.to(dtype)
    with torch.autocast(device_type=x_MI.device.type, enabled=False):
        return _GroupedLinear.apply(x_MI.contiguous(), weight_EOI, bias_EO, counts)


_BLOCK_BYTES = 16 << 20  # activation block size: below glibc's largest mmap threshold (32 MB)


def _sub_blocks(ranges: list[tuple[int, int, int]], row_bytes: int) -> list[tuple[int, int, int]]:
    """Split (expert, first row, end row) ranges into blocks of at most _BLOCK_BYTES of
    activations (at least 64 rows) each, in row order."""
    max_rows = max(64, _BLOCK_BYTES // max(row_bytes, 1))
    blocks = []
    for e, r0, r1 in ranges:
        rows = r1 - r0
        pieces = -(-rows // max_rows)
        for i in range(pieces):  # equal pieces: no tiny tail block
            blocks.append((e, r0 + rows * i // pieces, r0 + rows * (i + 1) // pieces))
    return blocks


class _GroupedFFN(torch.autograd.Function):
    """Whole-FFN experts, block by block: fc1, activation, fc2 for a block of one expert's rows.

    The activation runs on a block right after fc1 produced it (still in cache), instead of one
    pass over the whole M x F activation from memory. As the dense FFN does, it keeps the
    pre-activation h (for the activation's backward) and a = act(h) (fc2's input, for its weight
    gradient), but as one tensor per block of at most 16 MB: such blocks are recycled warm from
    glibc's heap on the next step, while one M x F buffer (50 MB for 4096 x 3072 fp32) would be
    fresh pages faulting 4 KiB at a time on every step (~15 ms per buffer on one core; the dense
    FFN pays that for each of its activations). An expert with many rows (an overloaded expert,
    a long dropless batch) is split into several blocks; in backward its weight gradient is then
    accumulated over the blocks, by up to one job per thread (the extra jobs sum into scratch
    buffers added at the end). Weight gradients are otherwise written in place as in
    `_GroupedLinear`.
    """

    @staticmethod
    def forward(ctx, x_MD, w1_EFD, b1_EF, w2_EDF, b2_ED, blocks, activation):
        act = ACTIVATIONS[activation]
        d_ff = w1_EFD.shape[1]
        y_MD = x_MD.new_empty(x_MD.shape[0], w2_EDF.shape[1])
        h_blocks: list[Tensor | None] = [None] * len(blocks)
        a_blocks: list[Tensor | None] = [None] * len(blocks)

        def job(i: int) -> Callable[[], None]:
            e, r0, r1 = blocks[i]

            def run() -> None:
                h_blocks[i] = h = linear_new(x_MD[r0:r1], w1_EFD[e], None if b1_EF is None else b1_EF[e])
                a_blocks[i] = a = act(h)
                linear_into(a, w2_EDF[e], None if b2_ED is None else b2_ED[e], y_MD[r0:r1])

            return run

        cost = 2 * d_ff * x_MD.shape[1]
        _run_expert_jobs([job(i) for i in range(len(blocks))], [(r1 - r0) * cost for _, r0, r1 in blocks],
                         x_MD.device.type == "cpu")
        ctx.activation, ctx.blocks = activation, blocks
        ctx.has_bias = (b1_EF is not None, b2_ED is not None)
        ctx.save_for_backward(x_MD, w1_EFD, w2_EDF, *h_blocks, *a_blocks)
        return y_MD

    @staticmethod
    def backward(ctx, grad_MD):
        x_MD, w1_EFD, w2_EDF, *saved = ctx.saved_tensors
        blocks = ctx.blocks
        h_blocks, a_blocks = saved[: len(blocks)], saved[len(blocks):]
        idle = len({e for e, _, _ in blocks}) < w1_EFD.shape[0]  # experts without rows: zero gradients
        grad_MD = grad_MD.contiguous()
        act_backward_ = ACTIVATION_BACKWARDS_[ctx.activation]
        need = ctx.needs_input_grad
        grad_x = x_MD.new_empty(x_MD.shape) if need[0] else None
        grads = {  # weight-gradient name -> its buffer (None when not needed)
            "w1": empty_like_large(w1_EFD, zero=idle) if need[1] else None,
            "b1": w1_EFD.new_zeros(w1_EFD.shape[:2]) if need[2] and ctx.has_bias[0] else None,
            "w2": empty_like_large(w2_EDF, zero=idle) if need[3] else None,
            "b2": w2_EDF.new_zeros(w2_EDF.shape[:2]) if need[4] and ctx.has_bias[1] else None,
        }
        threads = torch.get_num_threads() if x_MD.device.type == "cpu" else 1
        cost_per_row = 4 * w1_EFD.shape[1] * x_MD.shape[1]
        # Jobs: each expert's blocks, split into up to `threads` parts when that expert alone
        # holds more than a thread's share of the work (part 0 writes the final gradient, the
        # other parts write scratch gradients added afterwards).
        by_expert: dict[int, list[int]] = {}
        for i, (e, _, _) in enumerate(blocks):
            by_expert.setdefault(e, []).append(i)
        total = max(1, x_MD.shape[0])
        jobs, costs, scratch = [], [], []
        per_thread = threading.local()  # this call's scratch buffers, one per worker thread
        for e, idx in by_expert.items():
            rows = sum(blocks[i][2] - blocks[i][1] for i in idx)
            parts = max(1, min(len(idx), threads, round(threads * rows / total)))
            for p in range(parts):
                part = idx[len(idx) * p // parts: len(idx) * (p + 1) // parts]
                if p == 0:
                    targets = {k: (None if g is None else g[e]) for k, g in grads.items()}
                else:
                    targets = {k: (None if g is None else torch.empty_like(g[e])) for k, g in grads.items()}
                    scratch.append((e, targets))
                jobs.append(_ffn_backward_job(part, blocks, targets, x_MD, w1_EFD[e], w2_EDF[e], grad_MD,
                                              grad_x, h_blocks, a_blocks, act_backward_, per_thread))
                costs.append(cost_per_row * sum(blocks[i][2] - blocks[i][1] for i in part))
        _run_expert_jobs(jobs, costs, x_MD.device.type == "cpu")
        for e, targets in scratch:
            for k, t in targets.items():
                if t is not None:
                    grads[k][e].add_(t)
        return grad_x, grads["w1"], grads["b1"], grads["w2"], grads["b2"], None, None


def _ffn_backward_job(part, blocks, targets, x_MD, w1_FD, w2_DF, grad_MD, grad_x, h_blocks, a_blocks,
                      act_backward_, per_thread: threading.local) -> Callable[[], None]:
    """Backward of one expert's blocks `part`: input-gradient rows, and the weight gradients
    accumulated over the blocks into `targets` (the first block writes, the others add)."""

    def write(name: str, first: bool, a: Tensor, b: Tensor) -> None:
        if targets[name] is not None:
            torch.mm(a, b, out=targets[name]) if first else targets[name].addmm_(a, b)

    def write_sum(name: str, first: bool, g: Tensor) -> None:
        if targets[name] is not None:
            torch.sum(g, dim=0, out=targets[name]) if first else targets[name].add_(g.sum(dim=0))

    def run() -> None:
        # d loss / d h of every block goes through one scratch buffer per thread (a thread runs
        # its blocks in sequence): fresh memory per block would be new pages to fault in
        # whenever the heap is cold. (On oneDNN the product itself is such a temporary, copied
        # in: faster on a warm heap, which a training loop has, than torch.mm writing in place.)
        rows = max(blocks[i][2] - blocks[i][1] for i in part)
        scratch_RF = getattr(per_thread, "scratch_RF", None)
        if scratch_RF is None or scratch_RF.shape[0] < rows:
            scratch_RF = per_thread.scratch_RF = grad_MD.new_empty(rows, w2_DF.shape[1])
        for n, i in enumerate(part):
            _, r0, r1 = blocks[i]
            g_y = grad_MD[r0:r1]
            write("w2", n == 0, g_y.t(), a_blocks[i])
            write_sum("b2", n == 0, g_y)
            g_h = act_backward_(linear_into(g_y, w2_DF.t(), None, scratch_RF[: r1 - r0]), h_blocks[i])
            if grad_x is not None:
                linear_into(g_h, w1_FD.t(), None, grad_x[r0:r1])
            write("w1", n == 0, g_h.t(), x_MD[r0:r1])
            write_sum("b1", n == 0, g_h)

    return run


def grouped_ffn(
    x_MD: Tensor,
    w1_EFD: Tensor,
    b1_EF: Tensor | None,
    w2_EDF: Tensor,
    b2_ED: Tensor | None,
    counts: Sequence[int],
    activation: str = "gelu",
) -> Tensor:
    """y[block e] = act(x[block e] W1_e^T + b1_e) W2_e^T + b2_e: whole-FFN experts."""
    counts = _check_counts(counts, w1_EFD.shape[0], x_MD.shape[0])
    return _ffn_on_blocks(x_MD, w1_EFD, b1_EF, w2_EDF, b2_ED, _row_ranges(counts), activation)


def _row_ranges(counts: Sequence[int]) -> list[tuple[int, int, int]]:
    ranges, start = [], 0
    for e, c in enumerate(counts):
        if c:
            ranges.append((e, start, start + c))
        start += c
    return ranges


def _ffn_on_blocks(x_MD, w1_EFD, b1_EF, w2_EDF, b2_ED, ranges, activation) -> Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    device_type = x_MD.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_MD.dtype
    tensors = [t if t is None else t.to(dtype) for t in (x_MD, w1_EFD, b1_EF, w2_EDF, b2_ED)]
    blocks = _sub_blocks(ranges, w1_EFD.shape[1] * tensors[0].element_size())
    with torch.autocast(device_type=device_type, enabled=False):
        return _GroupedFFN.apply(tensors[0].contiguous(), *tensors[1:], blocks, activation)


def loop_reference(
    x_TI: Tensor, expert_ids_TK: Tensor, gates_TK: Tensor, expert_fns: Sequence[Callable[[Tensor], Tensor]]
) -> Tensor:
    """The slow, obviously-correct mixture: for each token, sum_k g_k expert_{e_k}(x_t).

    No capacity. Used by the tests as the reference for every fast path.
    """
    rows = []
    for t in range(x_TI.shape[0]):
        acc = None
        for k in range(expert_ids_TK.shape[1]):
            y = gates_TK[t, k].to(x_TI.dtype) * expert_fns[int(expert_ids_TK[t, k])](x_TI[t : t + 1])
            acc = y if acc is None else acc + y
        rows.append(acc)
    return torch.cat(rows)
