"""File helpers: atomic writes and checkpoint reads that fail with a message naming the file."""
from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Any

import torch

from .errors import BadInput, RunFailure


class CheckpointError(ValueError, BadInput):
    """A checkpoint or model file is missing, unreadable or not what was expected (bad input)."""


class DiskFullError(OSError, RunFailure):
    """A write failed because the file system is full; the message says so and names the file."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`, so a
    crash mid-write never leaves a truncated file under the final name. The file gets the normal
    mode (0666 less the umask), like any file the user writes, not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if _is_disk_full(exc):
            raise DiskFullError(errno.ENOSPC, f"no space left on device while writing {path}") from exc
        raise


def _is_disk_full(exc: BaseException) -> bool:
    # torch.save lets the file's OSError through; its C++ writer may wrap it in a RuntimeError.
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def load_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                         weights_only: bool = True) -> Any:
    """torch.load with errors that say which file is missing or unreadable (truncated, corrupt)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # zip/pickle errors have unhelpful messages on their own
        raise CheckpointError(
            f"checkpoint {path} could not be read ({type(exc).__name__}: {exc}); "
            "it may be truncated or corrupt"
        ) from exc
