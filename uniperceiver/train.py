"""python -m uniperceiver.train CONFIG [key=value ...]

Trains on the config's tasks; resumes from the newest valid checkpoint in train.output_dir.
Launch several processes with torchrun or srun (see launch/README.md).
"""
from __future__ import annotations

import logging
import sys

from .config import ConfigError, RunConfig, load_config, parse_cli


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout, force=True,
    )


def main(argv: list[str] | None = None) -> int:
    from . import distributed as du

    setup_logging(du.world_info().rank)
    try:
        path, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
        cfg = load_config(RunConfig, path, overrides)  # unknown keys fail here, before any work
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .engine import Trainer

    try:
        result = Trainer(cfg).train()
    except ConfigError as exc:  # a config value found bad at use, e.g. a path with an unset $DATA_PATH
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("uniperceiver.train").info("done: %s", result)
    du.shutdown()  # after success only: a failing rank must not wait in a barrier
    return 0


if __name__ == "__main__":
    sys.exit(main())
