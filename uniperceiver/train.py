"""python -m uniperceiver.train CONFIG [key=value ...] [--debug]

Trains on the config's tasks; resumes from the newest valid checkpoint in train.output_dir
(settings the optimizer and schedule read may change on resume and are logged; the model, the
tasks and the seed may not). One run per output directory (a lock file names the holder).
Launch several processes with torchrun or srun (see launch/README.md).
"""
from __future__ import annotations

import logging
import sys

from . import cli
from .config import RunConfig, load_config, parse_cli


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout, force=True,
    )


def _train(args: list[str]) -> int:
    from . import distributed as du

    setup_logging(du.world_info().rank)
    path, overrides = parse_cli(args)
    cfg = load_config(RunConfig, path, overrides)  # unknown keys fail here, before any work
    from .engine import Trainer

    from .engine.trainer import CollectiveError

    try:
        result = Trainer(cfg).train()
    except Exception as exc:
        if not isinstance(exc, CollectiveError):  # with a peer gone, even the teardown could hang
            du.abandon()  # leave without a barrier: a failing rank must not wait for the others
        raise
    logging.getLogger("uniperceiver.train").info("done: %s", result)
    du.shutdown()  # after success only: a failing rank must not wait in a barrier
    return cli.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return cli.run(_train, argv, doc=__doc__, sections=("model", "tasks", "target_sets", "train", "seed", "data_root"))


if __name__ == "__main__":
    sys.exit(main())
