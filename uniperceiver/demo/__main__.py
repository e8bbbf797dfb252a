"""python -m uniperceiver.demo [key=value ...]

The embedded CPU demo: trains the tiny Uni-Perceiver-MoE of `configs/debug/tiny_cpu.yaml` on the
packaged offline data (emoji images with their CLDR names, Fashion-MNIST, WordNet glosses) with
six tasks under unmixed task sampling, writes tensorboard logs and checkpoints under
`train.output_dir` (default `runs/demo`), then evaluates zero-shot on emoji subgroups it never
saw, and prints each result next to chance. Overrides are config keys, e.g. `train.max_steps=100`.
A second run on the same output_dir resumes (or, when finished, only evaluates).
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from .. import cli
from ..config import RunConfig, load_config
from ..train import setup_logging
from ..utils.resources import config_dir

CONFIG = config_dir() / "debug" / "tiny_cpu.yaml"


def chance_levels(cfg: RunConfig, report) -> dict[str, dict[str, float]]:
    """What a model that guesses would score on each reported metric (its TaskSpec's `chance`)."""
    from ..data import build_target_set
    from ..tasks import task_spec
    from ..tokenization import ClipTokenizer

    chance: dict[str, dict[str, float]] = {}
    tok = ClipTokenizer()
    for task_name, metrics in report.metrics.items():
        task = cfg.task(task_name)
        spec = task_spec(task.type)
        n = report.num_samples.get(task_name, 0)
        classes = 0
        if spec.class_labels:
            classes = len(build_target_set(task.target_set, cfg.target_sets[task.target_set], tok))
        levels = {name: spec.chance(name, classes, n) for name in metrics}
        chance[task_name] = {name: level for name, level in levels.items() if level is not None}
    return chance


def main(argv: list[str] | None = None) -> int:
    return cli.run(_demo, argv, doc=__doc__, sections=("model", "tasks", "target_sets", "train", "eval", "seed"))


def _demo(overrides: list[str]) -> int:
    setup_logging(0)
    log = logging.getLogger("uniperceiver.demo")
    if not CONFIG.exists():
        raise cli.BadInputError(f"the demo config {CONFIG} is missing: the package was installed without its configs")
    cfg = load_config(RunConfig, str(CONFIG), ["train.output_dir=runs/demo", *overrides])
    from ..engine import Trainer, list_checkpoints
    from ..engine.dcp import consolidate_model_state
    from ..evaluation.runner import evaluate

    t0 = time.perf_counter()
    log.info("training the tiny Uni-Perceiver-MoE on the embedded demo data (%d steps, %d tasks) -> %s",
             cfg.train.max_steps, sum(t.train_data is not None for t in cfg.tasks), cfg.train.output_dir)
    Trainer(cfg).train()  # a value found bad at use (e.g. a mistyped reader option) exits 2 via cli.run
    train_seconds = time.perf_counter() - t0
    checkpoint = list_checkpoints(cfg.train.output_dir)[-1][1]

    log.info("zero-shot evaluation of %s", checkpoint)
    cfg.eval.checkpoint = str(checkpoint)
    report = evaluate(cfg, progress=False, read_sharded=consolidate_model_state)
    chance = chance_levels(cfg, report)
    print()
    print(f"Uni-Perceiver-MoE demo: trained {cfg.train.max_steps} steps in {train_seconds / 60:.1f} min, "
          f"checkpoint {checkpoint}")
    print(f"tensorboard --logdir {Path(cfg.train.output_dir) / 'tensorboard'}")
    print()
    print(f"{'task':<22} {'metric':<16} {'ours':>8} {'chance':>8}   (held out: never seen in training)")
    for task_name, metrics in report.metrics.items():
        for name, value in metrics.items():
            ref = chance.get(task_name, {}).get(name)
            ref_text = f"{ref:8.2f}" if ref is not None else f"{'':>8}"
            print(f"{task_name:<22} {name:<16} {value:8.2f} {ref_text}")
    for task_name, notes in report.notes.items():
        for note in notes:
            print(f"note [{task_name}]: {note}")
    for task_name, preds in report.predictions.items():
        for p in preds[:3]:
            print(f"example [{task_name}]: {p}")
    print(f"\ntotal {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
