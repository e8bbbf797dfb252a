"""Run a function on n local gloo processes, with a free port and a hard timeout.

    run_distributed(worker, world_size=2, args=(...,), timeout_s=60)

`worker(rank, world_size, *args)` runs in a fresh process after `init_process_group("gloo")`
and after seeding torch with 1234 + rank; it asserts what it must (an exception in any rank
fails the call with that rank's traceback). A hang (mismatched collectives) is killed at the
timeout and reported as a failure, never waits forever. Workers must be module-level functions.
"""
from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, worker, args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.manual_seed(1234 + rank)
        worker(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(worker, world_size: int = 2, args: tuple = (), timeout_s: float = 60.0) -> None:
    ctx = mp.start_processes(
        _entry,
        args=(world_size, free_port(), worker, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=0.2):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{getattr(worker, '__name__', worker)} did not finish on {world_size} ranks "
                    f"within {timeout_s:.0f}s (a collective hung?)"
                )
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
