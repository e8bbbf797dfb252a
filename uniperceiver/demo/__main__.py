"""python -m uniperceiver.demo [key=value ...]

The embedded CPU demo: trains the tiny Uni-Perceiver-MoE of `configs/debug/tiny_cpu.yaml` on the
packaged offline data (emoji images with their CLDR names, Fashion-MNIST, WordNet glosses) with
six tasks under unmixed task sampling, writes tensorboard logs and checkpoints under
`train.output_dir` (default `runs/demo`), then evaluates zero-shot on emoji subgroups it never
saw, and prints each result next to chance. Then it shows adaptation: it prompt-tunes the model
on 1 % of a task it never trained on (emoji group names, `configs/debug/tiny_cpu_prompt_tuning.yaml`;
`demo/adapt.py`), writes the adapter and prints the prompt-tuned accuracy beside zero-shot and
chance on the same held-out emoji, with the adapter's size. Overrides are config keys, e.g.
`train.max_steps=100`; `adapt.<key>=value` goes to the adaptation run (`adapt.train.max_steps=50`),
`adapt=false` skips it. A second run on the same output_dir resumes (or, when finished, only
evaluates).
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
from .chance import chance_levels

CONFIG = config_dir() / "debug" / "tiny_cpu.yaml"


def main(argv: list[str] | None = None) -> int:
    return cli.run(_demo, argv, doc=__doc__, sections=("model", "tasks", "target_sets", "train", "eval", "seed"))


def _demo(overrides: list[str]) -> int:
    setup_logging(0)
    log = logging.getLogger("uniperceiver.demo")
    if not CONFIG.exists():
        raise cli.BadInputError(f"the demo config {CONFIG} is missing: the package was installed without its configs")
    from .adapt import ZERO_SHOT_TASK, adapt, split_overrides

    run_adaptation = "adapt=false" not in overrides
    overrides, adapt_overrides = split_overrides([o for o in overrides if o not in ("adapt=false", "adapt=true")])
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
    if run_adaptation and ZERO_SHOT_TASK not in report.metrics:
        log.info("adaptation skipped: it compares with %s, which was not evaluated", ZERO_SHOT_TASK)
    elif run_adaptation:
        print(flush=True)
        row = adapt(cfg, checkpoint, report.metrics[ZERO_SHOT_TASK]["top1"], adapt_overrides)
        print()
        print(row.title())
        print(row.table())
        print(row.summary())
    print(f"\ntotal {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
