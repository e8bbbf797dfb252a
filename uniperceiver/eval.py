"""Zero-shot evaluation: `python -m uniperceiver.eval CONFIG.yaml [key.path=value ...]`.

    python -m uniperceiver.eval configs/zeroshot/imagenet1k.yaml eval.checkpoint=ckpt/base_moe.pth
    torchrun --nproc_per_node 8 -m uniperceiver.eval configs/zeroshot/coco_caption.yaml \
        eval.checkpoint=ckpt/base_moe.pth eval.output_json=results/coco_caption.json

Prints a table of every metric, writes them (with the resolved config, the checkpoint path and
hash, and library versions) to `eval.output_json` (default `<train.output_dir>/eval.json`), and
exits 1 when a metric pinned in `eval.expected` misses by more than `eval.tolerance`, 2 on bad
input (config, checkpoint, data), 0 otherwise.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from .config import ConfigError, RunConfig, load_config, parse_cli
from .data.errors import DataError
from .distributed import init_distributed, pick_device_type, shutdown
from .engine.dcp import consolidate_model_state
from .evaluation.evaluators import EvalInputError
from .evaluation.report import output_path, write_report
from .evaluation.runner import evaluate
from .modeling.checkpoint import CheckpointError

USER_ERRORS = (ConfigError, EvalInputError, CheckpointError, DataError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        path, overrides = parse_cli(argv)
        cfg = load_config(RunConfig, path, overrides)
        cfg.check_data_paths("eval", cfg.eval.tasks)  # an unset $DATA_PATH fails before the model loads
        info = init_distributed(pick_device_type(cfg.train.device))
        report = evaluate(cfg, verbose=True, read_sharded=consolidate_model_state)  # files or DCP directories
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if info.is_main:
        print(report.table())
        for written in write_report(report, output_path(cfg)):
            print(f"wrote {written}")
        for miss in report.misses:
            actual = "not produced" if miss["actual"] is None else f"{miss['actual']:.4f}"
            print(f"MISS {miss['key']}: {actual}, expected {miss['expected']} ± {miss['tolerance']}",
                  file=sys.stderr)
    shutdown()
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
