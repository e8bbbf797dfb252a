"""One whole training step (forward, backward, AdamW) of Uni-Perceiver(-MoE), through the trainer.

    python benchmarks/train_step.py                      # CPU: base width, 2 layers (1 MoE layer)
    python benchmarks/train_step.py --dry-run            # tiny model, 2 repeats, nothing written (CI)
    python benchmarks/train_step.py --size base --device cuda          # the full base config on a GPU
    torchrun --nproc-per-node 2 benchmarks/train_step.py --ep 2        # MoE with EP=2 (gloo / NCCL)

Cases (each a real `uniperceiver.engine.Trainer` step on the packaged demo data, an image
classification task with its class-name target set): `dense`; `moe-attribute` and `moe-token`
(the released attribute router, and a token router with whole-FFN experts' linear form), replicated;
with `train.one_encoder_call` in the trainer, `/separate` variants encode the target set in its
own encoder pass (today's separate passes) next to the default one-call step. Under torchrun with
`--ep N`, the MoE cases run with `train.expert_parallel_size=N` and are compared with the same
cases replicated under DDP on the same ranks.

Measurement: batches are drawn once and replayed, so only the model's step is timed. After
warm-up, each repeat runs every case once in a fresh seeded random order (all cases see the same
machine state); reported per case: median step ms, min..max, tokens/s (input + target-set
tokens through the encoder per step), peak memory (CUDA: max allocated; CPU: peak RSS growth
during one extra step, sampled every 2 ms), and bytes this rank hands to torch.distributed
collectives per step (DDP buckets through a counting comm hook, everything else by wrapping
`torch.distributed`'s collectives; payload sent, not wire bytes). Ratios are paired:
`ratio_to_dense` = median over repeats of case_ms / dense_ms of the same repeat.

Output: a table and one JSON line per case appended to
`benchmarks/results/train_step_<size>_<host>_<date>.jsonl` with the machine, versions and commit
(the fields of expert_throughput.py). The module is a set of small functions (build_cases,
measure, comm counters, machine info) so GPU columns can be added next to them. `model_tflops_per_s`
and `mfu`: the encoder's model FLOPs of the step as the trainer counts them
(`uniperceiver/engine/flops.py`) per second of the median step, and that over the card's dense
peak for the step's matmul dtype (`--amp bf16`: bf16 tensor cores; None on a CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import gc
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from expert_throughput import append_rows, git_commit, host_kind, machine_info  # noqa: E402

RESULTS_DIR = str(ROOT / "benchmarks" / "results")

# Model sizes: (model yaml stem without _dense/_moe, config overrides, batch size, image size).
SIZES: dict[str, dict[str, Any]] = {
    # Base width (768, 12 heads, FFN 3072) with 2 layers: layer 0 is an MoE layer (even layers).
    "cpu": {"model": "base", "overrides": ["model.num_layers=2"], "batch": 16, "image_size": 160},
    "base": {"model": "base", "overrides": [], "batch": 64, "image_size": 224},
    "large": {"model": "large", "overrides": [], "batch": 32, "image_size": 224},
    # --dry-run: a few seconds anywhere.
    "tiny": {"model": "tiny", "overrides": ["model.num_layers=2"], "batch": 4, "image_size": 32},
}
MOE_CASES = {
    "moe-attribute": [],
    "moe-token": ["model.moe.routing.router=token"],
}


@dataclass
class Case:
    name: str
    overrides: list[str]
    moe: bool
    trainer: Any = None
    batches: list[Any] = field(default_factory=list)
    tokens_per_step: int = 0
    times_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # this process's CPU time (all threads) per step
    status: str = "ok"
    model_flops: float = 0.0  # encoder model FLOPs of one step (the trainer's count, engine/flops.py)
    peak_flops: float | None = None  # the card's dense peak for the step's matmul dtype (None: CPU)


# --- configuration -----------------------------------------------------------------------------


def run_yaml(size: dict, moe: bool, out_dir: str) -> str:
    """A run config: one image-classification task on the packaged Fashion-MNIST demo subset."""
    model = ROOT / "configs" / "model" / f"{size['model']}_{'moe' if moe else 'dense'}.yaml"
    return f"""_base_: {model}
model:
  image_size: {size['image_size']}
target_sets:
  fashion: {{kind: class_names, file: "demo:fashion_mnist_classes.txt"}}
tasks:
  - name: fashion_mnist
    type: image_classification
    target_set: fashion
    train_data: {{format: demo, options: {{source: fashion_mnist, subset: train}}}}
    batch_size: {size['batch']}
    augment: none
train:
  output_dir: {out_dir}
  max_steps: 1000000
  checkpoint_every: 1000000
  log_every: 1000000
  tensorboard: false
  optim: {{lr: 1.0e-4, warmup_steps: 0}}
"""


def trainer_keys() -> set[str]:
    from uniperceiver.config.schema import TrainConfig

    return set(TrainConfig.__dataclass_fields__)


def build_cases(size_name: str, ep: int, world: int) -> list[Case]:
    keys = trainer_keys()
    one_call = "one_encoder_call" in keys
    cases = [Case("dense", [], moe=False)]
    for name, extra in MOE_CASES.items():
        cases.append(Case(name, list(extra), moe=True))
        if one_call:
            cases.append(Case(f"{name}/separate", [*extra, "train.one_encoder_call=false"], moe=True))
        if ep > 1:
            cases.append(Case(f"{name}/ep{ep}", [*extra, f"train.expert_parallel_size={ep}"], moe=True))
    if ep > 1 and "expert_parallel_size" not in keys:
        for c in cases:
            if "/ep" in c.name:
                c.status = "skipped: this trainer has no train.expert_parallel_size"
    return cases


def make_trainer(case: Case, size: dict[str, Any], device: str, workdir: str, threads: int):
    from uniperceiver.config import RunConfig, load_config
    from uniperceiver.engine import Trainer

    folder = Path(workdir) / case.name.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.yaml").write_text(run_yaml(size, case.moe, str(folder / "out")))
    cfg = load_config(RunConfig, str(folder / "run.yaml"),
                      [*size["overrides"], *case.overrides, f"train.device={device}"])
    trainer = Trainer(cfg)
    trainer.model.train()
    return trainer


def replay_batches(trainer, count: int) -> tuple[list[Any], int]:
    """Draw `count` batches once and make the trainer replay them (the data pipeline is not
    what is measured). Returns the batches and the encoder tokens of one step."""
    batches = [trainer._next_batch(0, 0) for _ in range(count)]
    state = {"i": 0}

    def next_batch(task_idx: int, start: int):
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        return b

    trainer._next_batch = next_batch
    b = batches[0]
    tokens = int(b.inputs.batch_size) * int(_seq_len(trainer, b))
    target = trainer.target_sources["fashion"].get(seed=0)
    tokens += int(target.ids_NL.numel())
    return batches, tokens


def _seq_len(trainer, batch) -> int:
    cfg = trainer.cfg.model
    return (cfg.image_size // cfg.patch_size) ** 2 + 1


# --- measurement ---------------------------------------------------------------------------------


class CommCounter:
    """Bytes this rank hands to torch.distributed collectives (payload, not wire bytes)."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all_single", "all_to_all",
             "reduce_scatter_tensor", "reduce_scatter", "broadcast")

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}
        self.active = False

    def add(self, kind: str, nbytes: int) -> None:
        if self.active:
            self.bytes[kind] = self.bytes.get(kind, 0) + int(nbytes)

    def total(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes = {}

    @contextlib.contextmanager
    def suspended(self):
        """Collectives made here are already counted (DDP's hook calls dist.all_reduce)."""
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was

    @contextlib.contextmanager
    def patched(self):
        originals = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}

        def wrap(name, fn):
            @functools.wraps(fn)
            def counted(*args, **kwargs):
                self.add(name, _payload_bytes(name, args, kwargs))
                return fn(*args, **kwargs)
            return counted

        for n, fn in originals.items():
            setattr(dist, n, wrap(n, fn))
        try:
            yield self
        finally:
            for n, fn in originals.items():
                setattr(dist, n, fn)


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _payload_bytes(name: str, args, kwargs) -> int:
    """The tensor this rank sends: the input of gathers / all-to-alls / reduce-scatters, the
    tensor itself for all-reduce and broadcast."""
    if name in ("all_reduce", "broadcast"):
        return _nbytes(args[0] if args else kwargs.get("tensor"))
    if name == "all_gather":
        return _nbytes(args[1] if len(args) > 1 else kwargs.get("tensor"))
    if name == "all_to_all":
        return _nbytes(args[1] if len(args) > 1 else kwargs.get("input_tensor_list"))
    return _nbytes(args[1] if len(args) > 1 else kwargs.get("input") or kwargs.get("input_tensor"))


def attach_ddp_counter(trainer, counter: CommCounter) -> None:
    """DDP all-reduces its buckets in C++: count them through a comm hook."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(trainer.ddp, DDP):
        def hook(state, bucket):
            buf = bucket.buffer()
            counter.add("ddp_all_reduce", buf.numel() * buf.element_size())
            with counter.suspended():  # the hook's dist.all_reduce is this same payload
                return default_hooks.allreduce_hook(None, bucket)

        trainer.ddp.register_comm_hook(None, hook)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_of(step, device: torch.device) -> int:
    """Peak memory growth of one call of `step` (CUDA: max allocated; CPU: sampled RSS)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        step()
    finally:
        done.set()
        t.join()
    return max(peak[0], _rss_bytes()) - base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(case: Case, device: torch.device) -> tuple[float, float]:
    """(wall ms, this process's CPU ms over all threads) of one step."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    logs = case.trainer.train_step()
    _sync(device)
    wall_ms, cpu_ms = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
    case.model_flops = float(logs.get("model_flops", 0.0))
    case.peak_flops = getattr(case.trainer, "peak_flops", None)
    return wall_ms, cpu_ms


def measure(cases: list[Case], device: torch.device, warmup: int, repeats: int, seed: int,
            counter: CommCounter) -> dict[str, Any]:
    """Interleaved timing (same shuffled order on every rank: collectives must match), then one
    counted step and one memory step per case."""
    live = [c for c in cases if c.status == "ok"]
    rng = random.Random(seed)
    for _ in range(warmup):
        for c in live:
            timed_step(c, device)
    orders = []
    for _ in range(repeats):
        order = live[:]
        rng.shuffle(order)
        orders.append([c.name for c in order])
        for c in order:
            wall_ms, cpu_ms = timed_step(c, device)
            c.times_ms.append(wall_ms)
            c.cpu_ms.append(cpu_ms)
    extra = {}
    for c in live:
        counter.reset()
        counter.active = True
        timed_step(c, device)
        counter.active = False
        mem = peak_memory_of(lambda c=c: c.trainer.train_step(), device)
        extra[c.name] = {"comm_bytes_per_step": counter.total(), "comm_bytes_by_kind": dict(counter.bytes),
                         "peak_memory_bytes": mem}
    return {"orders": orders, "extra": extra}


def paired_ratio(case: Case, ref: Case, attr: str = "times_ms") -> float | None:
    mine, theirs = getattr(case, attr), getattr(ref, attr)
    if not mine or not theirs:
        return None
    return statistics.median(a / b for a, b in zip(mine, theirs, strict=True))


def rows_for(cases: list[Case], measured: dict, meta: dict) -> list[dict]:
    by_name = {c.name: c for c in cases}
    dense = by_name["dense"]
    rows = []
    for c in cases:
        row = {"bench": "train_step", "case": c.name, "status": c.status, **meta}
        if c.status == "ok":
            med = statistics.median(c.times_ms)
            row.update(
                median_ms=round(med, 2), min_ms=round(min(c.times_ms), 2), max_ms=round(max(c.times_ms), 2),
                times_ms=[round(t, 2) for t in c.times_ms], tokens_per_step=c.tokens_per_step,
                tokens_per_s=round(c.tokens_per_step / (med / 1e3), 1), ratio_to_dense=_round(paired_ratio(c, dense)),
                ratio_of_medians=_round(med / statistics.median(dense.times_ms)),
                # The same pairing on CPU time: less sensitive to other processes on a shared host.
                median_cpu_ms=round(statistics.median(c.cpu_ms), 2) if c.cpu_ms else None,
                cpu_ms=[round(t, 2) for t in c.cpu_ms],
                cpu_ratio_to_dense=_round(paired_ratio(c, dense, "cpu_ms")),
                model_tflops_per_s=c.model_flops / (med / 1e3) / 1e12,
                # MFU: model FLOP/s (at the median step time) over the card's dense peak
                mfu=None if not c.peak_flops else _round(c.model_flops / (med / 1e3) / c.peak_flops),
                **measured["extra"][c.name],
            )
            base = c.name.split("/")[0]
            if c.name.endswith("/separate") and base in by_name:  # one call vs separate passes
                row["one_call_over_separate"] = _round(paired_ratio(by_name[base], c))
                row["cpu_one_call_over_separate"] = _round(paired_ratio(by_name[base], c, "cpu_ms"))
            if "/ep" in c.name and base in by_name:
                row["ratio_to_replicated"] = _round(paired_ratio(c, by_name[base]))
        rows.append(row)
    return rows


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


HEADER = (f"{'case':<26} {'median ms':>10} {'min..max':>17} {'tokens/s':>9} {'/dense':>7} {'1call/sep':>9} "
          f"{'cpu/dense':>9} "
          f"{'peak MB':>8} {'comm MB':>8} {'TFLOP/s':>8} {'MFU':>6}")


def fmt(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['case']:<26} {row['status']}"
    one = row.get("one_call_over_separate")
    mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    return (f"{row['case']:<26} {row['median_ms']:>10.1f} {row['min_ms']:>8.0f}..{row['max_ms']:<8.0f} "
            f"{row['tokens_per_s']:>9.0f} {row['ratio_to_dense']:>7.3f} {'' if one is None else f'{one:.3f}':>9} "
            f"{'-' if row['cpu_ratio_to_dense'] is None else format(row['cpu_ratio_to_dense'], '.3f'):>9} "
            f"{row['peak_memory_bytes'] / 2**20:>8.0f} {row['comm_bytes_per_step'] / 2**20:>8.1f} "
            f"{row['model_tflops_per_s']:>8.3f} {mfu:>6}")


# --- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="cpu", choices=sorted(SIZES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs)")
    ap.add_argument("--ep", type=int, default=1, help="under torchrun: expert-parallel size of the /epN cases")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, help="images per step instead of the size's (tokens per step scale with it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", nargs="+", help="only these case names (dense is always kept)")
    ap.add_argument("--dry-run", action="store_true", help="tiny model, 1 warm-up, 2 repeats, nothing written")
    ap.add_argument("--out", help="JSONL path (default: results/train_step_<size>_<host>_<date>.jsonl)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                    help="train.amp of every case (GPU: bf16 autocast over fp32 master weights)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.size, args.warmup, args.repeats, args.no_write = "tiny", 1, 2, True

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    from uniperceiver import distributed as du

    info = du.init_distributed(device.type)  # the trainers join this group
    rank, world = du.rank(), du.world_size()
    if args.ep > 1 and world % args.ep:
        print(f"error: --ep {args.ep} must divide the number of processes ({world}); run under torchrun", file=sys.stderr)
        return 2
    size = dict(SIZES[args.size], **({"batch": args.batch} if args.batch else {}))
    cases = build_cases(args.size, args.ep, world)
    if args.cases:
        cases = [c for c in cases if c.name == "dense" or c.name in args.cases]
    for c in cases:
        c.overrides.append(f"train.amp={args.amp}")
    counter = CommCounter()
    with tempfile.TemporaryDirectory(prefix="train_step_") as workdir, counter.patched():
        for c in cases:
            if c.status != "ok":
                continue
            c.trainer = make_trainer(c, size, device.type, workdir, args.threads)
            attach_ddp_counter(c.trainer, counter)
            c.batches, c.tokens_per_step = replay_batches(c.trainer, count=4)
        meta = {
            "size": args.size, "machine": machine_info(device), "git_commit": git_commit(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "world_size": world, "rank": rank, "ep": args.ep, "warmup": args.warmup, "repeats": args.repeats,
            "host": host_kind(device), "launcher": info.source,
            "batch": size["batch"], "image_size": size["image_size"],
        }
        if rank == 0:
            print(f"# {meta['machine']['cpu']} | {meta['machine']['gpu'] or 'no gpu'} | threads {torch.get_num_threads()} "
                  f"| world {world} | torch {torch.__version__} | commit {meta['git_commit']} "
                  f"| load {meta['machine'].get('loadavg_1m')}")
            print(HEADER)
        t0 = time.perf_counter()
        measured = measure(cases, device, args.warmup, args.repeats, args.seed, counter)
        meta["loadavg_1m_after"] = os.getloadavg()[0]
        rows = rows_for(cases, measured, meta)
        for c in cases:
            if c.trainer is not None:
                c.trainer.logger.close()
            c.trainer = None
        gc.collect()
    out_path = args.out or os.path.join(
        RESULTS_DIR, f"train_step_{args.size}_{host_kind(device)}_{_dt.date.today().isoformat()}.jsonl")
    if rank == 0:
        for row in rows:
            print(fmt(row))
        print(f"# {time.perf_counter() - t0:.0f}s" + ("" if args.no_write else f"; appended to {os.path.relpath(out_path)}"))
        if not args.no_write:
            append_rows(out_path, rows)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from uniperceiver import cli

    sys.exit(cli.run(main, handles_help=True))  # exit codes: 0 ok, 2 bad input, 3 failed
