"""Zero-shot evaluation: `python -m uniperceiver.eval CONFIG.yaml [key.path=value ...] [--debug]`.

    python -m uniperceiver.eval configs/zeroshot/imagenet1k.yaml eval.checkpoint=ckpt/base_moe.pth
    torchrun --nproc_per_node 8 -m uniperceiver.eval configs/zeroshot/coco_caption.yaml \\
        eval.checkpoint=ckpt/base_moe.pth eval.output_json=results/coco_caption.json

Prints a table of every metric, writes them (with the resolved config, the checkpoint path and
hash, and library versions) to `eval.output_json` (default `<train.output_dir>/eval.json`), and
exits 1 when a metric pinned in `eval.expected` misses by more than `eval.tolerance`, 2 on bad
input (config, checkpoint, data), 0 otherwise.

The model is the one the checkpoint records: a model.* value in the config that differs from it
is an error (set it on the command line to evaluate that way deliberately). Per-task settings:
`tasks.<name>.eval_batch_size=64`. Pins: `eval.expected.<task>/<metric>=v` replaces the config's
pins for that task; pin keys are checked before anything is evaluated.
"""
from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence

from . import cli
from .config import ConfigError, RunConfig, load_config, load_yaml, parse_cli

# What each task type reports (the names `eval.expected` may pin).
METRICS = {
    "image_classification": r"top\d+", "video_classification": r"top\d+", "text_classification": r"top\d+",
    "image_retrieval": r"(i2t|t2i)_R@\d+|R_mean", "video_retrieval": r"(i2t|t2i)_R@\d+|R_mean",
    "image_caption": r"Bleu_[1-4]|METEOR|ROUGE_L|CIDEr|SPICE", "video_caption": r"Bleu_[1-4]|METEOR|ROUGE_L|CIDEr|SPICE",
    "text_mlm": r"accuracy",
}
_PIN = "eval.expected."


def split_pin_overrides(overrides: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(other overrides, {'task/metric': value text}) from `eval.expected.<task>/<metric>=v`."""
    rest, pins = [], {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key.startswith(_PIN):
            pins[key[len(_PIN):]] = value
        else:
            rest.append(item)
    return rest, pins


def apply_pins(cfg: RunConfig, pins: dict[str, str]) -> None:
    """Command-line pins replace every config pin of the tasks they name (not merged with them)."""
    parsed = {}
    for key, text in pins.items():
        try:
            parsed[key] = float(text)
        except ValueError:
            raise ConfigError(f"command-line override 'eval.expected.{key}={text}': expected a number") from None
    tasks = {k.partition("/")[0] for k in parsed}
    kept = {k: v for k, v in cfg.eval.expected.items() if k.partition("/")[0] not in tasks}
    cfg.eval.expected = {**kept, **parsed}


def check_pins(cfg: RunConfig) -> None:
    """Every pin names an evaluated task and a metric that task reports; fail before evaluating."""
    from .evaluation.runner import eval_tasks

    evaluated = {t.name: t for t in eval_tasks(cfg)}
    for key in cfg.eval.expected:
        task, sep, metric = key.partition("/")
        if not sep or not task or not metric:
            raise ConfigError(f"eval.expected key {key!r}: expected 'task/metric'")
        if task not in evaluated:
            raise ConfigError(f"eval.expected key {key!r}: {task!r} is not an evaluated task "
                              f"(evaluated: {sorted(evaluated)})")
        pattern = METRICS.get(evaluated[task].type)
        if pattern is not None and not re.fullmatch(pattern, metric):
            raise ConfigError(f"eval.expected key {key!r}: a {evaluated[task].type} task reports no {metric!r} "
                              f"(its metrics match {pattern})")


def build_config(path: str, overrides: Sequence[str]) -> RunConfig:
    overrides, pins = split_pin_overrides(overrides)
    cfg = load_config(RunConfig, path, overrides)
    apply_pins(cfg, pins)
    for name in cfg.eval.tasks or ():
        if name not in {t.name for t in cfg.tasks}:
            raise ConfigError(f"eval.tasks names {name!r}, which is not a task of {path} "
                              f"(tasks: {[t.name for t in cfg.tasks]})")
    check_pins(cfg)
    if cfg.eval.checkpoint:
        from .config.schema import resolve_path
        from .modeling.config_check import recorded_model_config, reconcile_model_config

        from .utils.resources import find_config

        in_files: dict[str, str] = {}
        load_yaml(find_config(path), provenance=in_files)
        on_cli = {item.partition("=")[0].strip() for item in overrides}
        checkpoint = resolve_path(cfg.eval.checkpoint)
        cfg.model = reconcile_model_config(cfg.model, recorded_model_config(checkpoint), checkpoint,
                                           set_in_files=in_files.keys(), set_on_cli=on_cli)
    return cfg


def _eval(args: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .distributed import init_distributed, pick_device_type, shutdown
    from .engine.dcp import consolidate_model_state
    from .evaluation.report import output_path, write_report
    from .evaluation.runner import evaluate

    path, overrides = parse_cli(args)
    cfg = build_config(path, overrides)
    cfg.check_data_paths("eval", cfg.eval.tasks)  # an unset $DATA_PATH fails before the model loads
    info = init_distributed(pick_device_type(cfg.train.device))
    report = evaluate(cfg, verbose=True, read_sharded=consolidate_model_state)  # files or DCP directories
    if info.is_main:
        print(report.table())
        for written in write_report(report, output_path(cfg)):
            print(f"wrote {written}")
        for miss in report.misses:
            actual = "not produced" if miss["actual"] is None else f"{miss['actual']:.4f}"
            print(f"MISS {miss['key']}: {actual}, expected {miss['expected']} ± {miss['tolerance']}",
                  file=sys.stderr)
    shutdown()
    return cli.EXIT_OK if report.passed else cli.EXIT_METRIC_MISSED


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_eval, argv, doc=__doc__, sections=("model", "tasks", "target_sets", "eval", "train", "data_root"))


if __name__ == "__main__":
    sys.exit(main())
