"""File helpers: atomic writes and checkpoint reads that fail with a message naming the file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`, so a
    crash mid-write never leaves a truncated file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                         weights_only: bool = True) -> Any:
    """torch.load with errors that say which file is missing or unreadable (truncated, corrupt)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # zip/pickle errors have unhelpful messages on their own
        raise ValueError(
            f"checkpoint {path} could not be read ({type(exc).__name__}: {exc}); "
            "it may be truncated or corrupt"
        ) from exc
