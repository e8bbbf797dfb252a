"""The one place that reads torchrun / SLURM variables and sets up torch.distributed.

Everything else asks `world_info()` or the helpers here; nothing else reads RANK or SLURM_PROCID.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config.loader import ConfigError


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # "torchrun", "slurm" or "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: `scontrol show hostnames` when present, else a parse of
    the common `prefix[01-04,07]` form."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.split(",")[0].split("-")[0].rstrip("]")
        return prefix + first
    return head


def world_info(environ: dict[str, str] | None = None) -> WorldInfo:
    """Rank, local rank, world size and rendezvous address from torchrun or SLURM variables.

    torchrun (RANK/WORLD_SIZE set) wins; under `srun` without torchrun the SLURM_* variables are
    used, MASTER_ADDR defaults to the first node and MASTER_PORT to 29500 + (job id % 1000) so
    concurrent jobs on a node do not collide.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job = int(env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", "0")) or 0)
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        return WorldInfo(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_NTASKS"]),
            master_addr=addr,
            master_port=int(env.get("MASTER_PORT", 29500 + job % 1000)),
            source="slurm",
        )
    return WorldInfo()


def pick_device_type(want: str) -> str:
    """`train.device` ('auto' | 'cpu' | 'cuda') -> 'cuda' or 'cpu'; auto takes CUDA when present.
    Training, evaluation and the eval command all choose here."""
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but CUDA is not available")
    return "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"


def local_device(device_type: str) -> torch.device:
    """This process's device of `device_type` (CUDA: the one `init_distributed` selected)."""
    return torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")


def init_distributed(device_type: str = "cpu", timeout_s: float = 1800.0) -> WorldInfo:
    """Initialise the default process group when the environment asks for several processes
    (gloo on CPU, NCCL on CUDA) and pick this process's CUDA device."""
    info = world_info()
    if device_type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if info.distributed and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", info.master_addr)
        os.environ.setdefault("MASTER_PORT", str(info.master_port))
        dist.init_process_group(
            backend="nccl" if device_type == "cuda" else "gloo",
            init_method=f"tcp://{info.master_addr}:{info.master_port}",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return info


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (a list of one outside distributed runs)."""
    if world_size() == 1:
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Leave the process group cleanly: without it, gloo's threads may abort the interpreter at
    exit ('terminate called without an active exception') and torchrun reports a failure."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def abandon() -> None:
    """Leave the process group after an error, without the barrier of `shutdown`."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 -- already failing; the original error is what matters
            pass
