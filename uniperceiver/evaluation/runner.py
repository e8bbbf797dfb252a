"""Zero-shot evaluation of a checkpoint on the tasks of a run config.

    report = evaluate(cfg)                       # cfg: RunConfig; what `python -m uniperceiver.eval` runs
    report.metrics["coco_caption"]["CIDEr"]

The run, job by job: the model is loaded here through the one model loader
(`uniperceiver.modeling.checkpoint`: the config's `model:` section, the checkpoint strictly, the
evaluation settings, so MoE layers run dropless and no token is ever dropped); each task runs
through `loop.evaluate_task` (its data, its evaluator, sharded over the ranks); `report.py` holds
the metrics, the pinned-metric checks, the table and the JSON. Target sets are encoded once per
run (and cached on disk with `eval.cache_dir`).
"""
from __future__ import annotations

import logging
import os
import sys
import time

import torch

from .. import distributed as dist_utils
from ..config import ConfigError, RunConfig, resolve_path, to_dict
from ..modeling.checkpoint import ShardedReader, eval_settings, load_model
from ..modeling.model import UniPerceiver
from .caption_metrics import SCORERS
from .loop import EvalRun, eval_tasks, evaluate_task
from .report import EvalReport, check_expected, output_path, versions, write_report
from .target_features import TargetFeatures, file_sha256, model_fingerprint

__all__ = ["EvalReport", "evaluate", "output_path", "write_report"]

log = logging.getLogger(__name__)


def _pick_device(cfg: RunConfig) -> torch.device:
    return dist_utils.local_device(dist_utils.pick_device_type(cfg.train.device))


def evaluate(
    cfg: RunConfig,
    *,
    model: UniPerceiver | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    caption_scorers: tuple[str, ...] = SCORERS,
    spice: bool | None = None,
    verbose: bool = False,
    read_sharded: ShardedReader | None = None,
) -> EvalReport:
    """Evaluate `cfg.eval.checkpoint` (or `model`) on the config's eval tasks.

    `progress`: bars on rank 0 (default: when stderr is a terminal). `caption_scorers` / `spice`
    choose the caption metrics (all; SPICE when its jars are installed). `verbose` prints a line
    per task to stderr (rank 0). `read_sharded` reads a checkpoint directory (the eval command
    passes `engine.dcp.consolidate_model_state`). Runs on every rank of an initialised process
    group; an error on any rank is raised on every rank.
    """
    from ..tokenization import ClipTokenizer

    rank, world = dist_utils.rank(), dist_utils.world_size()
    if progress is None:  # bars on a terminal; none in log files (SLURM, CI)
        progress = sys.stderr.isatty()
    device = torch.device(device) if device is not None else _pick_device(cfg)
    tasks = eval_tasks(cfg)
    checkpoint = cfg.eval.checkpoint if model is None else None  # a given model is hashed instead
    # A prompt-tuning adapter loaded on top of the checkpoint (its base).
    adapter = resolve_path(cfg.eval.adapter) if cfg.eval.adapter and checkpoint else None
    if model is None:
        if not checkpoint:
            raise ConfigError("no checkpoint to evaluate: set eval.checkpoint=PATH (in the config or "
                              "as a command-line override)")
        model = load_model(checkpoint, cfg.model, device=device, read_sharded=read_sharded, adapter=adapter)
        prompt = model.cfg.prompt
        if adapter and prompt.fc and prompt.fc_prompt_tasks and not {t.name for t in tasks} & set(prompt.fc_prompt_tasks):
            log.warning("adapter %s: its FC prompt was trained for tasks %s, none of which is evaluated here "
                        "(evaluated without it: %s)", adapter, prompt.fc_prompt_tasks, [t.name for t in tasks])
    else:
        model = model.to(device).eval()
    memo: dict[str, str] = {}

    def checkpoint_sha256() -> str:
        if "sha" not in memo:
            memo["sha"] = file_sha256(checkpoint)
        return memo["sha"]

    def adapter_sha256() -> str:
        if "adapter" not in memo:
            memo["adapter"] = file_sha256(adapter)
        return memo["adapter"]

    def weights_sha256() -> str:  # what the weights come from: the checkpoint (+ the adapter)
        return checkpoint_sha256() if adapter is None else f"{checkpoint_sha256()}+{adapter_sha256()}"

    def model_key() -> str:  # only computed when a disk cache needs it
        if "model" not in memo:
            memo["model"] = model_fingerprint(model, weights_sha256() if checkpoint else None)
        return memo["model"]

    features = TargetFeatures(model, chunk_size=cfg.eval.target_chunk_size, cache_dir=cfg.eval.cache_dir,
                              model_key=model_key, progress=progress and rank == 0)
    if cfg.eval.caption_metrics is not None and caption_scorers is SCORERS:
        caption_scorers = tuple(cfg.eval.caption_metrics)
    spice = cfg.eval.spice if spice is None else spice
    run = EvalRun(cfg, model, device, ClipTokenizer(), features, cfg.resolved_data_root(), rank, world,
                  progress and rank == 0, verbose, tuple(caption_scorers), spice)
    report = EvalReport()
    for task in tasks:
        start = time.perf_counter()
        with eval_settings(model):
            result, n = evaluate_task(run, task)
        report.metrics[task.name] = result.metrics
        if result.notes:
            report.notes[task.name] = result.notes
        if result.predictions is not None:
            report.predictions[task.name] = result.predictions
        report.num_samples[task.name] = n
        report.seconds[task.name] = round(time.perf_counter() - start, 3)
        run.say(f"{task.name}: done in {report.seconds[task.name]:.1f} s")

    report.checks = check_expected(report.metrics, cfg.eval.expected, cfg.eval.tolerance)
    report.meta = {
        "checkpoint": {"path": None if checkpoint is None else os.path.abspath(checkpoint),
                       "sha256": checkpoint_sha256() if checkpoint and rank == 0 else None},
        "adapter": None if adapter is None else {"path": os.path.abspath(adapter),
                                                 "sha256": adapter_sha256() if rank == 0 else None},
        "config": to_dict(cfg),
        "world_size": world,
        "device": str(device),
        "target_sets": {"encoded": features.encoded, "loaded_from_cache": features.loaded},
        "versions": versions(),
        "command": " ".join(sys.argv),
    }
    return report
