"""Training logs: a console progress line with ETA, tensorboard scalars and `metrics.jsonl`.

Every rank runs its own task, so at each log step the per-task numbers of all ranks are gathered
(one small collective at the same steps on every rank) and rank 0 writes them.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from moe import Decision

from .. import distributed as du
from ..config.schema import TrainConfig

log = logging.getLogger("uniperceiver.train")


def moe_stats(decisions: list[tuple[str, Decision]]) -> dict[str, float]:
    """Per routed sublayer: share of gate mass per expert, mean gate entropy, and for token
    routing the drop rate and imbalance of its dispatch."""
    stats: dict[str, float] = {}
    for name, decision in decisions:
        # One interface for segment and token decisions (moe.Decision).
        ids, gates, logits = decision.expert_ids_NK, decision.gates_NK, decision.logits_NE
        ids, gates = ids.detach().cpu().reshape(-1), gates.detach().float().cpu().reshape(-1)
        num_experts = logits.shape[-1] if logits is not None else int(ids.max()) + 1
        load = torch.zeros(num_experts).index_add_(0, ids, gates)
        load = load / load.sum().clamp_min(1e-9)
        for e, v in enumerate(load.tolist()):
            stats[f"moe/{name}/expert_{e}"] = v
        if logits is not None:
            p = torch.softmax(logits.detach().float().cpu(), -1)
            stats[f"moe/{name}/gate_entropy"] = float(-(p * p.clamp_min(1e-9).log()).sum(-1).mean())
        routing = decision.routing_stats
        if routing is not None:
            stats[f"moe/{name}/drop_rate"] = routing.drop_rate
            stats[f"moe/{name}/imbalance"] = routing.imbalance
    return stats


class TrainLogger:
    def __init__(self, output_dir: Path, cfg: TrainConfig, is_main: bool) -> None:
        self.cfg, self.is_main, self.output_dir = cfg, is_main, output_dir
        self.window: list[dict[str, Any]] = []
        self.start_time = time.perf_counter()
        self.start_step: int | None = None
        self.writer = None
        self.jsonl = None
        if is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(output_dir / "metrics.jsonl", "a")
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log_step(self, step: int, logs: dict[str, Any], lr: float, model: torch.nn.Module) -> None:
        if self.start_step is None:
            self.start_step = step - 1
        record = {"step": step, "grad_norm": logs["grad_norm"], "seconds": logs["seconds"], "skipped": logs["skipped"],
                  "tasks": [(name, loss, metrics, size) for name, loss, metrics, _, size in logs["micro"]],
                  "moe": moe_stats([d for *_, decisions, _ in logs["micro"] for d in decisions]),
                  "model_flops": logs.get("model_flops", 0.0), "peak_flops": logs.get("peak_flops")}
        self.window.append(record)
        if step % self.cfg.log_every != 0 and step != self.cfg.max_steps:
            return
        gathered = du.all_gather_objects(self.window)  # same steps on every rank
        self.window = []
        if not self.is_main:
            return
        per_task: dict[str, list[float]] = defaultdict(list)
        metrics: dict[str, list[float]] = defaultdict(list)
        moe: dict[str, list[float]] = defaultdict(list)
        samples, seconds = 0, 0.0
        for rank_records in gathered:
            for rec in rank_records:
                for name, loss, task_metrics, size in rec["tasks"]:
                    per_task[name].append(loss)
                    samples += size
                    for k, v in task_metrics.items():
                        metrics[f"{name}/{k}"].append(v)
                for k, v in rec["moe"].items():
                    moe[k].append(v)
            seconds = max(seconds, sum(r["seconds"] for r in rank_records))
        last = gathered[0][-1]
        temps = {n: float(p.detach().exp().clamp(max=model.cfg.temperature_cap))
                 for n, p in model.predictor.logit_scale.items()}
        row = {"step": step, "lr": lr, "grad_norm": last["grad_norm"],
               "loss": {k: sum(v) / len(v) for k, v in per_task.items()},
               "metrics": {k: sum(v) / len(v) for k, v in metrics.items()},
               "samples_per_s": samples / max(seconds, 1e-9), "temperature": temps,
               "skipped_steps": sum(r["skipped"] for rr in gathered for r in rr)}
        # Model FLOP/s of all ranks together (engine/flops.py), and per rank over the card's peak.
        flops = sum(r.get("model_flops", 0.0) for rr in gathered for r in rr)
        row["model_tflops_per_s"] = flops / max(seconds, 1e-9) / 1e12
        peak = last.get("peak_flops")
        row["mfu"] = None if not peak else flops / len(gathered) / max(seconds, 1e-9) / peak
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in row["loss"].items():
                self.writer.add_scalar(f"loss/{k}", v, step)
            for k, v in row["metrics"].items():
                self.writer.add_scalar(f"metrics/{k}", v, step)
            for k, v in temps.items():
                self.writer.add_scalar(f"temperature/{k}", v, step)
            for k, v in moe.items():
                self.writer.add_scalar(k, sum(v) / len(v), step)
            self.writer.add_scalar("lr", lr, step)
            self.writer.add_scalar("grad_norm", row["grad_norm"], step)
            self.writer.add_scalar("throughput/samples_per_s", row["samples_per_s"], step)
            self.writer.add_scalar("throughput/model_tflops_per_s", row["model_tflops_per_s"], step)
            if row["mfu"] is not None:
                self.writer.add_scalar("throughput/mfu", row["mfu"], step)
        elapsed = time.perf_counter() - self.start_time
        done = step - (self.start_step or 0)
        eta = elapsed / max(done, 1) * (self.cfg.max_steps - step)
        losses = " ".join(f"{k}={v:.3f}" for k, v in sorted(row["loss"].items()))
        mfu_text = "" if row["mfu"] is None else f" | MFU {100 * row['mfu']:.1f}%"
        log.info("step %d/%d | %s | lr %.2e | %.1f samples/s | %.2f it/s%s | eta %s",
                 step, self.cfg.max_steps, losses, lr, row["samples_per_s"], done / max(elapsed, 1e-9),
                 mfu_text, _fmt_seconds(eta))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"
