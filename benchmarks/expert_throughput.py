"""Expert-layer throughput: our MoE layers (and, with --peers, fairscale / DeepSpeed / Tutel) against
k x the dense FFN, measured in the same run.

    python benchmarks/expert_throughput.py --preset cpu-reference --peers
    python benchmarks/expert_throughput.py --router token --top-k 1 2 --capacity-factor 1.0 dropless
    torchrun --nproc-per-node 2 benchmarks/expert_throughput.py --router token --ep   # expert-parallel

Every row times one forward+backward of the layer on `tokens` tokens (d_model -> d_ff -> d_model).
Rows of the same sizes and top-k (every capacity factor; our layer and the peers) form a group
measured together with the dense FFN on the same tokens: each repeat runs dense and every
member once, in a fresh seeded random order, after warm-up. It reports the median ms/iter and its spread
(min..max), tokens/s, and
    ratio_to_k_dense = median over repeats of row_ms / (top_k x dense_ms of the same repeat)
(`ratio_of_medians` = median(row) / (top_k x median(dense)) is kept too); dense is k x cheaper
than a top-k layer that computes every routed token, so 1.0 is the floor for any exact top-k
MoE on the same kernels. Merged rows (attribute/task/modality routers, released semantics)
compare to 1 x dense. The dense FFN is PyTorch's (F.linear); where our experts run on other
matmul kernels (oneDNN for fp32 on CPU, `moe/kernels.py`) a second dense FFN on those kernels is
timed too, and `ratio_to_k_dense_moe_kernels` (column /kern) is the ratio against it.
Peer rows also carry `paired_ratio_to_ours` (median of peer_ms / our_ms over the same repeats).
Rows are appended as JSONL to benchmarks/results/expert_throughput_<preset>_<host>_<date>.jsonl
with the machine, versions and git commit. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime as _dt
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe import MoEConfig, MoEFFN, RoutingContext  # noqa: E402
from moe.config import DATA_INDEPENDENT_ROUTERS  # noqa: E402
from moe.kernels import linear as moe_linear, use_onednn  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Case:
    """One row of the grid."""

    impl: str  # "ours", "fairscale", "deepspeed", "tutel"
    router: str
    backend: str
    top_k: int
    capacity_factor: float | None  # None = dropless (token routing) or n/a (merged routing)
    experts: int
    d_model: int
    d_ff: int
    tokens: int
    dtype: str
    routing: str  # "learned" | "uniform"
    expert_type: str
    ep_size: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def k_dense(self) -> int:
        return 1 if self.router in DATA_INDEPENDENT_ROUTERS else self.top_k


PRESETS = {
    # d_model 768, d_ff 3072, 8 experts, 4096 tokens, fp32, forward+backward.
    "cpu-reference": dict(
        d_model=768, d_ff=3072, experts=8, tokens=4096, dtype="float32",
        merged_routers=["attribute", "task", "modality"],
        token_top_k=[1, 2], capacity_factors=[1.0, 1.25, None], routing="uniform",
        warmup=1, repeats=9, peer_repeats=3,
    ),
    # The same rows at toy sizes: what `gpu_suite.sh --dry-run` runs on a CPU in CI.
    "tiny": dict(
        d_model=32, d_ff=64, experts=4, tokens=256, dtype="float32",
        merged_routers=["attribute", "task", "modality"],
        token_top_k=[1, 2], capacity_factors=[1.0, 1.25, None], routing="uniform",
        warmup=1, repeats=2, peer_repeats=1,
    ),
}


# --- machine and versions -----------------------------------------------------------------------


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "MOE_HUGEPAGE_GRADS": os.environ.get("MOE_HUGEPAGE_GRADS", "1"),
    }
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    for mod in ("fairscale", "deepspeed", "tutel"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "installed")
        except Exception:  # noqa: BLE001 - any import failure just means "absent"
            info[mod] = None
    return info


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def git_commit() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        # Code only: the results files (appended by every run) and docs do not make a run dirty.
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "moe/*.py", "benchmarks/*.py"],
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:  # noqa: BLE001
        return None


def append_rows(path: str, rows: list[dict]) -> None:
    """Append result rows to a JSONL results file (results accumulate across runs)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def host_kind(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for tag in ("h200", "h100", "a100", "v100", "l40", "a10"):
            if tag in name:
                return tag
        return "gpu"
    cpu = machine_info(device)["cpu"].lower()
    vendor = "amd" if "amd" in cpu else "intel" if "intel" in cpu else "arm" if "arm" in cpu else "cpu"
    return f"{vendor}-{torch.get_num_threads()}threads"


# --- the layers under test ------------------------------------------------------------------------


class DenseFFN(nn.Module):
    """The dense reference: Linear, GELU, Linear. `moe_kernels=True` runs its linears through the
    matmul kernels our experts use (`moe.kernels.linear`: oneDNN for fp32 on CPU) instead of
    PyTorch's own F.linear, to tell our layer's overhead from the kernel's speed."""

    def __init__(self, d_model: int, d_ff: int, moe_kernels: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.linear = moe_linear if moe_kernels else F.linear

    def forward(self, x):
        h = F.gelu(self.linear(x, self.fc1.weight, self.fc1.bias))
        return self.linear(h, self.fc2.weight, self.fc2.bias)


def build_ours(case: Case, ep_group) -> Callable:
    cfg = MoEConfig(
        num_experts=case.experts, top_k=case.top_k, router=case.router, noise="none",
        capacity_factor_train=case.capacity_factor or 1.0, dropless=case.capacity_factor is None,
        min_capacity=4, uniform_routing=case.routing == "uniform" and case.router not in DATA_INDEPENDENT_ROUTERS,
        backend=case.backend, expert_type=case.expert_type,
    )
    layer = MoEFFN(case.d_model, case.d_ff, cfg, ep_group=ep_group)
    ctx = RoutingContext(
        attributes_SA=torch.tensor([[1.0, 0, 0, 1, 1, 0, 0, 0]]),
        task_ids_S=torch.tensor([0]), modality_ids_S=torch.tensor([0]),
    )
    stats = {}

    def forward(x):
        y, dec = layer(x, ctx)
        if getattr(dec, "stats", None) is not None:
            stats["drop_rate"] = dec.stats.drop_rate
        return y

    forward.module, forward.stats = layer, stats
    return forward


def build_peer(case: Case) -> Callable:
    d, f, e = case.d_model, case.d_ff, case.experts

    def ffn():
        return DenseFFN(d, f)

    if case.impl == "fairscale":
        from fairscale.nn import MOELayer, Top2Gate

        layer = MOELayer(Top2Gate(d, e), nn.ModuleList([ffn() for _ in range(e)]))

        def forward(x):  # fairscale wants (groups, tokens, model) with groups % experts == 0
            return layer(x.reshape(-1, 1, d)).view_as(x)

    elif case.impl == "deepspeed":
        from deepspeed.moe.layer import MoE

        layer = MoE(hidden_size=d, expert=ffn(), num_experts=e, ep_size=1, k=case.top_k,
                    capacity_factor=case.capacity_factor, eval_capacity_factor=case.capacity_factor,
                    min_capacity=4, drop_tokens=True)

        def forward(x):
            return layer(x)[0]

    elif case.impl == "tutel":
        from tutel import moe as tutel_moe

        layer = tutel_moe.moe_layer(
            gate_type={"type": "top", "k": case.top_k, "capacity_factor": case.capacity_factor},
            model_dim=d,
            experts={"type": "ffn", "count_per_node": e, "hidden_size_per_expert": f,
                     "activation_fn": F.gelu},
        )

        def forward(x):
            return layer(x)

    else:
        raise ValueError(case.impl)
    forward.module, forward.stats = layer, {}
    return forward


# --- timing ------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0): hand every free heap page back to the OS (cold-heap steps)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError) as exc:
        raise SystemExit(f"--cold-heap needs glibc's malloc_trim: {exc}") from exc
    return lambda: trim(0)


def make_step(forward: Callable, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, device,
              before: Callable[[], None] | None = None) -> Callable[[], float]:
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> float:
        for p in params:  # as optimizer.zero_grad(set_to_none=True) leaves them
            p.grad = None
        x.grad = None
        if before is not None:
            before()
        _sync(device)
        t0 = time.perf_counter()
        forward(x).backward(grad)
        _sync(device)
        return (time.perf_counter() - t0) * 1e3

    return step


def measure_group(members: list[tuple[Case, Callable]], dense: nn.Module, device, dtype, warmup: int, repeats: int,
                  seed: int = 0, cold_heap: bool = False, dense_moe_kernels: nn.Module | None = None) -> list[dict]:
    """Time every member of a group and the dense FFN interleaved, on the same input.

    Each repeat runs dense and every member once, in a fresh (seeded) random order, so all of
    them see the same machine state and a varied set of predecessors; per-repeat ratios pair each member with that
    repeat's dense step (and, for peers, with our layer's step). `dense_moe_kernels` (the dense
    FFN on our matmul kernels) is a second reference, timed the same way.
    """
    case0 = members[0][0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, case0.tokens, case0.d_model, generator=g).to(device=device, dtype=dtype).requires_grad_()
    grad = torch.randn(1, case0.tokens, case0.d_model, generator=g).to(device=device, dtype=dtype)
    before = _malloc_trim() if cold_heap else None
    refs = [dense] + ([] if dense_moe_kernels is None else [dense_moe_kernels])
    steps = [make_step(r, r, x, grad, device, before) for r in refs] + [
        make_step(f, f.module, x, grad, device, before) for _, f in members]
    for _ in range(warmup):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    order_rng = random.Random(seed)
    previous = None
    for _ in range(repeats):
        # A fresh order every repeat (seeded): a step leaves state behind for the next one
        # (heap, page and cache state), and a fixed or rotated cycle would give every member
        # the same predecessor each time. Nobody runs twice in a row across repeats.
        order = list(range(len(steps)))
        while True:
            order_rng.shuffle(order)
            if len(order) < 2 or order[0] != previous:
                break
        for j in order:
            times[j].append(steps[j]())
        previous = order[-1]
    dense_ms, dmed = times[0], statistics.median(times[0])
    kernel_ms = times[1] if dense_moe_kernels is not None else None
    member_ms = times[len(refs):]
    ours_ms = {(c.top_k, c.capacity_factor): t for (c, _), t in zip(members, member_ms)
               if c.impl == "ours" and c.backend == members[0][0].backend}
    rows = []
    for (case, forward), row_ms in zip(members, member_ms):
        med, k = statistics.median(row_ms), case.k_dense
        row = {
            "ms_median": round(med, 3),
            "ms_min": round(min(row_ms), 3),
            "ms_max": round(max(row_ms), 3),
            "ms_all": [round(v, 3) for v in row_ms],
            "tokens_per_s": round(case.tokens / (med / 1e3), 1),
            "dense_ms_median": round(dmed, 3),
            "dense_ms_all": [round(v, 3) for v in dense_ms],
            "repeats": repeats,
            # Headline: the median over repeats of (this step / k x the dense step of the same
            # repeat). Pairing cancels the machine's slow drifts and bursts, which on a shared
            # 2-core host move either median alone by +-10 %.
            "ratio_to_k_dense": round(statistics.median(r / (k * d) for r, d in zip(row_ms, dense_ms)), 4),
            "ratio_of_medians": round(med / (k * dmed), 4),
            "drop_rate": forward.stats.get("drop_rate"),
            # The same ratio against the dense FFN on our matmul kernels (null where they are
            # torch's own): what our layer costs beyond the kernel it runs on.
            "dense_moe_kernels_ms_median": None if kernel_ms is None else round(statistics.median(kernel_ms), 3),
            "ratio_to_k_dense_moe_kernels": None if kernel_ms is None else round(
                statistics.median(r / (k * d) for r, d in zip(row_ms, kernel_ms)), 4),
        }
        mine = ours_ms.get((case.top_k, case.capacity_factor))
        if case.impl != "ours" and mine is not None:
            # > 1: the peer is slower than our layer on the same work, in the same repeats.
            row["paired_ratio_to_ours"] = round(statistics.median(r / o for r, o in zip(row_ms, mine)), 4)
        rows.append(row)
    return rows


# --- grid --------------------------------------------------------------------------------------


def preset_cases(name: str, backends: list[str], peers: bool, ep_size: int) -> tuple[list[Case], dict]:
    p = PRESETS[name]
    common = dict(experts=p["experts"], d_model=p["d_model"], d_ff=p["d_ff"], tokens=p["tokens"],
                  dtype=p["dtype"], ep_size=ep_size)
    cases = []
    for backend in backends:
        for router in p["merged_routers"]:
            cases.append(Case("ours", router, backend, 2, None, routing="learned", expert_type="linear", **common))
        for top_k in p["token_top_k"]:
            for cf in p["capacity_factors"]:
                cases.append(Case("ours", "token", backend, top_k, cf, routing=p["routing"], expert_type="ffn", **common))
    if peers:
        cases += peer_cases(p["token_top_k"], [c for c in p["capacity_factors"] if c is not None], common)
    return cases, p


def peer_cases(top_ks, cfs, common) -> list[Case]:
    cases = []
    for cf in cfs:
        for top_k in top_ks:
            cases.append(Case("deepspeed", "token", "deepspeed", top_k, cf, routing="learned", expert_type="ffn", **common))
            cases.append(Case("tutel", "token", "tutel", top_k, cf, routing="learned", expert_type="ffn", **common))
    # fairscale's Top2Gate has a fixed capacity of 2 * tokens / experts (capacity factor 1.0).
    cases.append(Case("fairscale", "token", "fairscale", 2, 1.0, routing="learned", expert_type="ffn", **common))
    return cases


def grid_cases(args, ep_size: int) -> list[Case]:
    cases = []
    cfs = [None if c == "dropless" else float(c) for c in args.capacity_factor]
    for backend in args.backend:
        for router in args.router:
            for e in args.experts:
                for k in args.top_k:
                    for d in args.d_model:
                        for f in args.d_ff:
                            for t in args.tokens:
                                merged = router in DATA_INDEPENDENT_ROUTERS
                                for cf in ([None] if merged else cfs):
                                    cases.append(Case(
                                        "ours", router, backend, k, cf, e, d, f, t, args.dtype,
                                        "learned" if merged else args.routing,
                                        args.expert_type or ("linear" if merged else "ffn"), ep_size,
                                    ))
    if args.peers:
        common = dict(experts=args.experts[0], d_model=args.d_model[0], d_ff=args.d_ff[0],
                      tokens=args.tokens[0], dtype=args.dtype, ep_size=ep_size)
        cases += peer_cases(args.top_k, [c for c in cfs if c is not None] or [1.0], common)
    return cases


def group_cases(cases: list[Case]) -> list[list[Case]]:
    """Cases that do the same work, measured together (interleaved, one dense baseline).

    A group = same sizes and, for token routing, the same top-k (every capacity factor, ours and
    the peers); merged routers form one group. Groups of many members matter: every step leaves
    state behind for the next one (glibc's heap: a layer that frees many mid-size blocks makes
    the next step's allocations warm; pages, caches), measured at up to +-10 % on this
    kind of host, so each step should follow a varied set of others. fairscale (2x slower than the rest) gets a group of its
    own so that it does not dominate the run time; its rows use the peer repeat count.
    """
    groups: dict[tuple, list[Case]] = {}
    for c in cases:
        merged = c.router in DATA_INDEPENDENT_ROUTERS
        key = (c.experts, c.d_model, c.d_ff, c.tokens, c.dtype, c.ep_size, merged,
               None if merged else c.top_k, c.impl == "fairscale")
        groups.setdefault(key, []).append(c)
    return list(groups.values())


def _smoke(forward: Callable, case: Case, device, dtype) -> None:
    x = torch.randn(1, case.tokens, case.d_model, device=device, dtype=dtype, requires_grad=True)
    forward(x).sum().backward()
    for p in forward.module.parameters():
        p.grad = None


# --- main --------------------------------------------------------------------------------------


def init_distributed(device_type: str) -> tuple[int, int]:
    """torchrun sets WORLD_SIZE; otherwise a one-process gloo group (the peers need one)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("gloo", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def measure_cases(cases: list[Case], meta: dict, ep_group, device, dtype, warmup: int, repeats: int,
                  peer_repeats: int, cold_heap: bool, verbose: bool) -> list[dict]:
    """Build and measure every group of cases; one row dict per case, in order.

    The layers live only inside this call: under torchrun they hold the process group, which
    must be released before `destroy_process_group` (gloo aborts at exit otherwise).
    """
    rows = []
    for members in group_cases(cases):
        group_rows, runnable = [], []
        for case in members:
            torch.manual_seed(0)
            row = {**asdict(case), **meta, "status": "ok",
                   "loadavg_1m_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
            try:
                if case.impl != "ours" and meta["world_size"] > 1:
                    raise RuntimeError("peers are measured in single-process runs only")
                forward = build_ours(case, ep_group) if case.impl == "ours" else build_peer(case)
                forward.module.to(device=device, dtype=dtype)
                if case.impl != "ours":  # a peer that cannot run on this machine fails here, alone
                    _smoke(forward, case, device, dtype)
                runnable.append((case, forward))
            except Exception as exc:  # noqa: BLE001 - a peer that cannot run is recorded, not fatal
                row["status"] = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            group_rows.append(row)
        if runnable:
            torch.manual_seed(0)
            dense = DenseFFN(members[0].d_model, members[0].d_ff).to(device=device, dtype=dtype)
            dense_kernels = None
            ours_here = any(c.impl == "ours" for c, _ in runnable)
            if ours_here and use_onednn(torch.empty(0, device=device, dtype=dtype)):  # kernels differ from torch's
                dense_kernels = DenseFFN(members[0].d_model, members[0].d_ff, moe_kernels=True)
                dense_kernels.load_state_dict(dense.state_dict())
            reps = repeats if ours_here else peer_repeats
            measured = iter(measure_group(runnable, dense, device, dtype, warmup, reps, cold_heap=cold_heap,
                                          dense_moe_kernels=dense_kernels))
            ok = {id(c) for c, _ in runnable}
            for case, row in zip(members, group_rows):
                if id(case) in ok:
                    row.update(next(measured))
        rows += group_rows
        if verbose:
            for row in group_rows:
                print(fmt_row(row), flush=True)
    return rows


def fmt_row(r: dict) -> str:
    cf = "dropless" if r["capacity_factor"] is None and r["router"] not in DATA_INDEPENDENT_ROUTERS else (
        "-" if r["capacity_factor"] is None else f"{r['capacity_factor']:.2f}")
    if r["status"] != "ok":
        return f"{r['impl']:<10}{r['router']:<10}{r['backend']:<10}{r['top_k']:>3}  {cf:<9}  {r['status']}"
    drop, vs, kern = r.get("drop_rate"), r.get("paired_ratio_to_ours"), r.get("ratio_to_k_dense_moe_kernels")
    return (f"{r['impl']:<10}{r['router']:<10}{r['backend']:<10}{r['top_k']:>3}  {cf:<9}"
            f"{r['ms_median']:>10.1f}{r['ms_min']:>9.1f}{r['ms_max']:>9.1f}{r['tokens_per_s']:>11.0f}"
            f"{r['dense_ms_median']:>10.1f}{r['ratio_to_k_dense']:>9.3f}{r['ratio_of_medians']:>8.3f}"
            f"{'' if kern is None else f'{kern:.3f}':>8}"
            f"{'' if vs is None else f'{vs:.3f}':>8}{'' if drop is None else f'{drop:.3f}':>8}")


HEADER = (f"{'impl':<10}{'router':<10}{'backend':<10}{'k':>3}  {'cf':<9}{'ms/iter':>10}{'min':>9}{'max':>9}"
          f"{'tokens/s':>11}{'dense ms':>10}{'ratio':>9}{'med/med':>8}{'/kern':>8}{'/ours':>8}{'drop':>8}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS))
    ap.add_argument("--router", nargs="+", default=["token"], choices=["attribute", "task", "modality", "token", "context"])
    ap.add_argument("--backend", nargs="+", default=["torch"], choices=["torch", "tutel", "auto"])
    ap.add_argument("--experts", nargs="+", type=int, default=[8])
    ap.add_argument("--top-k", nargs="+", type=int, default=[2])
    ap.add_argument("--capacity-factor", nargs="+", default=["1.0"], help="floats and/or 'dropless'")
    ap.add_argument("--d-model", nargs="+", type=int, default=[768])
    ap.add_argument("--d-ff", nargs="+", type=int, default=[3072])
    ap.add_argument("--tokens", nargs="+", type=int, default=[4096])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--expert-type", choices=["linear", "ffn"], help="default: linear for merged routers, ffn for token")
    ap.add_argument("--routing", default="learned", choices=["learned", "uniform"],
                    help="uniform: token t -> experts (t*k + j) %% E, measures the layer without router imbalance")
    ap.add_argument("--peers", action="store_true", help="add fairscale / DeepSpeed / Tutel on the same work")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--ep", action="store_true", help="under torchrun: shard experts over all ranks")
    ap.add_argument("--cold-heap", action="store_true",
                    help="glibc malloc_trim(0) before every timed step: each starts from an empty heap")
    ap.add_argument("--out", help="JSONL path (default: <out-dir>/<fixed name scheme>)")
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if args.peers and device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rank, world = init_distributed(device.type)
    ep_group = dist.group.WORLD if (args.ep and world > 1) else None
    ep_size = world if ep_group is not None else 1
    dtype = getattr(torch, args.dtype)

    if args.preset:
        cases, p = preset_cases(args.preset, args.backend, args.peers, ep_size)
        cases = [replace(c, dtype=args.dtype) for c in cases]  # a preset's rows in --dtype (default fp32)
        warmup, repeats, peer_repeats = p["warmup"], p["repeats"], p["peer_repeats"]
    else:
        cases = grid_cases(args, ep_size)
        warmup, repeats, peer_repeats = 1, 5, 3
    warmup = args.warmup if args.warmup is not None else warmup
    repeats = args.repeats if args.repeats is not None else repeats
    peer_repeats = args.repeats if args.repeats is not None else peer_repeats
    # Peers share our groups (and our repeat count); `peer_repeats` is for groups without ours.

    meta = {
        "preset": args.preset, "machine": machine_info(device), "git_commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "world_size": world, "warmup": warmup, "host": host_kind(device), "cold_heap": args.cold_heap,
    }
    out_path = args.out or os.path.join(
        args.out_dir,
        f"expert_throughput_{args.preset or 'custom'}_{host_kind(device)}_{_dt.date.today().isoformat()}.jsonl",
    )
    if rank == 0:
        print(f"# {meta['machine']['cpu']} | {meta['machine']['gpu'] or 'no gpu'} | threads {torch.get_num_threads()} "
              f"| torch {torch.__version__} | python {platform.python_version()} | commit {meta['git_commit']}")
        print(f"# tokens {cases[0].tokens} d_model {cases[0].d_model} d_ff {cases[0].d_ff} experts {cases[0].experts} "
              f"{args.dtype} fwd+bwd, warmup {warmup}, repeats {repeats} (groups without ours: {peer_repeats}), ep_size {ep_size}")
        print(HEADER)
    t_start = time.perf_counter()
    rows = measure_cases(cases, meta, ep_group, device, dtype, warmup, repeats, peer_repeats, args.cold_heap,
                         verbose=rank == 0)
    if rank == 0:
        print(f"# {len(rows)} rows in {time.perf_counter() - t_start:.0f}s"
              + ("" if args.no_write else f"; appended to {os.path.relpath(out_path)}"))
        if not args.no_write:
            append_rows(out_path, rows)
    if dist.is_initialized():
        gc.collect()  # layers (and their reference to the group) in cycles go before the group
        dist.barrier()  # gloo aborts at exit when one rank tears down while another still talks
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from uniperceiver import cli

    sys.exit(cli.run(main, handles_help=True))  # exit codes: 0 ok, 2 bad input, 3 failed
