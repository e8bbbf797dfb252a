"""The demo's adaptation step: prompt-tune the trained demo model on 1 % of a task it never
trained on and compare it with zero-shot on the same held-out items.

The task (configs/debug/tiny_cpu_prompt_tuning.yaml) is emoji GROUP classification: the demo
trained on the 99 subgroups and evaluates the 9 group names zero-shot (`emoji_group_zeroshot`).
Prompt tuning trains the release's trainable set (deep prompts, s_token_bias, the FC prompt,
norms, ln_post) on `train.data_fraction` of the TRAINING emoji and writes an adapter; the
evaluation loads base + adapter through the one loader and scores the zero-shot row's items (the
held-out subgroups). `check_no_leakage` proves the two sets of emoji are disjoint.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import ConfigError, RunConfig, load_config
from ..utils.resources import config_dir

log = logging.getLogger("uniperceiver.demo")

ADAPT_CONFIG = config_dir() / "debug" / "tiny_cpu_prompt_tuning.yaml"
ADAPT_TASK = "emoji_group"  # the adaptation config's task
ZERO_SHOT_TASK = "emoji_group_zeroshot"  # the demo's zero-shot row of the same items
PREFIX = "adapt."  # demo overrides with this prefix go to the adaptation config


@dataclass
class AdaptationRow:
    task: str
    metric: str
    chance: float | None
    zero_shot: float
    prompt_tuned: float
    adapter: Path
    adapter_bytes: int
    adapter_values: int
    model_values: int
    train_samples: int
    pool_samples: int
    eval_samples: int
    steps: int
    seconds: float
    fraction: float

    def title(self) -> str:
        return (f"Adaptation: prompt tuning on {100 * self.fraction:g} % of a task the model never trained on "
                "(scored on the zero-shot row's held-out emoji)")

    def table(self) -> str:
        chance = f"{self.chance:8.2f}" if self.chance is not None else f"{'':>8}"
        size = f"{self.adapter_bytes / 1024:.1f} KB"
        return "\n".join([
            f"{'task':<22} {'metric':<8} {'chance':>8} {'zero-shot':>10} {'prompt-tuned':>13} {'adapter':>10}",
            f"{self.task:<22} {self.metric:<8} {chance} {self.zero_shot:10.2f} {self.prompt_tuned:13.2f} {size:>10}",
        ])

    def summary(self) -> str:
        return (f"prompt-tuned on {self.train_samples} of {self.pool_samples} training emoji (none of the "
                f"{self.eval_samples} evaluated), {self.steps} steps in {self.seconds / 60:.1f} min; adapter "
                f"{self.adapter} ({self.adapter_bytes:,} bytes: {self.adapter_values:,} trained values of "
                f"{self.model_values:,})")


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(the demo's overrides, the adaptation config's: those given as `adapt.<key>=value`)."""
    demo = [o for o in overrides if not o.startswith(PREFIX)]
    return demo, [o[len(PREFIX):] for o in overrides if o.startswith(PREFIX)]


def adaptation_config(demo_cfg: RunConfig, checkpoint: str | os.PathLike, overrides: list[str]) -> RunConfig:
    """The adaptation run: its YAML, starting from the demo's checkpoint, under the demo's output
    directory, with the model the demo trained (plus the YAML's prompts)."""
    out = Path(demo_cfg.train.output_dir) / "prompt_tuning"
    cfg = load_config(RunConfig, str(ADAPT_CONFIG),
                      [f"train.output_dir={out}", f"train.init_from={checkpoint}",
                       f"train.device={demo_cfg.train.device}", *overrides])
    cfg.model = replace(demo_cfg.model, prompt=cfg.model.prompt)
    zero_shot = demo_cfg.task(ZERO_SHOT_TASK)
    if cfg.task(ADAPT_TASK).eval_data != zero_shot.eval_data or cfg.task(ADAPT_TASK).target_set != zero_shot.target_set:
        raise ConfigError(f"{ADAPT_CONFIG}: task {ADAPT_TASK!r} must be evaluated on the items and names of the "
                          f"demo's {ZERO_SHOT_TASK!r} (eval_data, target_set), or the two rows do not compare")
    return cfg


def check_no_leakage(cfg: RunConfig) -> tuple[int, int, int]:
    """(training samples, training pool, evaluated samples); a ConfigError if an evaluated emoji
    is in the training subset the trainer draws (`engine.sampler.fraction_indices`)."""
    from ..data import build_dataset
    from ..engine.sampler import fraction_indices
    from ..tokenization import ClipTokenizer

    task = cfg.task(ADAPT_TASK)
    tok = ClipTokenizer()
    train = build_dataset(task, "train", tok, cfg.model, cfg.resolved_data_root())
    evaluated = build_dataset(task, "eval", tok, cfg.model, cfg.resolved_data_root())
    task_id = [t.name for t in cfg.tasks].index(ADAPT_TASK)
    subset = fraction_indices(len(train), cfg.train.data_fraction, cfg.seed, task_id)
    # The emoji's row in the packaged arrays (a sample's "id"), read from the records: no image is decoded.
    trained_ids = {train.records[i].data["row"] for i in subset}
    eval_ids = {r.data["row"] for r in evaluated.records}
    leaked = sorted(trained_ids & eval_ids)
    if leaked:
        raise ConfigError(f"task {ADAPT_TASK!r}: the training subset holds {len(leaked)} evaluated emoji (ids "
                          f"{leaked[:5]}): train_data must not overlap eval_data, or the row is not held out")
    return len(subset), len(train), len(evaluated)


def adapt(demo_cfg: RunConfig, checkpoint: str | os.PathLike, zero_shot: float, overrides: list[str]) -> AdaptationRow:
    """Prompt-tune, save the adapter, evaluate base + adapter; the row to print."""
    from ..engine import Trainer
    from ..evaluation.runner import evaluate
    from ..modeling.adapter import read_adapter
    from .chance import chance_levels

    cfg = adaptation_config(demo_cfg, checkpoint, overrides)
    train_samples, pool, eval_samples = check_no_leakage(cfg)
    log.info("prompt tuning on %d of %d training emoji (%s), %d steps -> %s", train_samples, pool, ADAPT_TASK,
             cfg.train.max_steps, cfg.train.output_dir)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.train()
    seconds = time.perf_counter() - t0
    model_values = sum(p.numel() for p in trainer.model.parameters())
    adapter = Path(cfg.train.output_dir) / "adapter.pt"

    cfg.eval.checkpoint, cfg.eval.adapter, cfg.eval.tasks = str(checkpoint), str(adapter), [ADAPT_TASK]
    report = evaluate(cfg, progress=False)  # base + adapter, through the one loader
    values = sum(t.numel() for t in read_adapter(adapter).tensors.values())
    metric = "top1"
    return AdaptationRow(
        task=ADAPT_TASK, metric=metric, chance=chance_levels(cfg, report).get(ADAPT_TASK, {}).get(metric),
        zero_shot=zero_shot, prompt_tuned=report.metrics[ADAPT_TASK][metric], adapter=adapter,
        adapter_bytes=adapter.stat().st_size, adapter_values=values, model_values=model_values,
        train_samples=train_samples, pool_samples=pool, eval_samples=eval_samples, steps=cfg.train.max_steps,
        seconds=seconds, fraction=cfg.train.data_fraction)
