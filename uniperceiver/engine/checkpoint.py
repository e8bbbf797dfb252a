"""Training checkpoints: atomic writes, rotation that only ever counts readable files, resume
from the newest readable one.

Layout: `<output_dir>/checkpoints/step_<8-digit step>.pt`, a dict with at least `model`,
`optimizer` and `step`, plus `scheduler`, `scaler`, `config` and every rank's RNG states.

The rules (the same for any checkpoint kind: `rotate` takes the entries and a verifier, so the
sharded directory checkpoints follow them too):
- a file that cannot be read is never counted as a checkpoint and never deleted: it is moved to
  `checkpoints/corrupt/` with a warning;
- rotation keeps the newest `keep_last` *readable* checkpoints and deletes only readable ones
  older than those;
- temporary files of interrupted saves (`.step_*.tmp`) are removed when a run starts.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..utils.io import CheckpointError, atomic_torch_save, load_checkpoint_file

log = logging.getLogger(__name__)
_NAME = re.compile(r"^step_(\d{8})\.pt$")
_TEMP = re.compile(r"^\.step_\d{8}\.pt\..*\.tmp$")
REQUIRED_KEYS = ("model", "optimizer", "step")
CORRUPT_DIR = "corrupt"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(output_dir) / f"step_{step:08d}.pt"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every file named like a checkpoint, oldest first, readable or not."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return sorted(found)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a usable checkpoint, or None when it is. Cheap: the file is memory-mapped,
    so the archive's index and the pickled structure are read, not every tensor's bytes (a
    truncated or junk file fails here; its index lives at the end of the archive)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001 -- zip/pickle/OS errors all mean "unreadable"
        return f"{type(exc).__name__}: {exc}"
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a checkpoint dict"
    missing = [k for k in REQUIRED_KEYS if k not in state]
    return f"lacks {missing}" if missing else None


def set_aside(path: Path, reason: str) -> Path:
    """Move an unreadable checkpoint to `<its folder>/corrupt/` (never delete it) and warn."""
    dest_dir = path.parent / CORRUPT_DIR
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / path.name
    n = 1
    while dest.exists():
        dest, n = dest_dir / f"{path.name}.{n}", n + 1
    path.rename(dest)
    log.warning("checkpoint %s is unreadable (%s); moved it to %s", path, reason, dest)
    return dest


def _remove(path: Path) -> None:
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def rotate(entries: Sequence[tuple[int, Path]], keep_last: int,
           problem: Callable[[Path], str | None] = checkpoint_problem,
           aside: Callable[[Path, str], Path] = set_aside,
           remove: Callable[[Path], None] = _remove) -> list[Path]:
    """Keep the newest `keep_last` readable entries (oldest first in `entries`), delete readable
    older ones, set unreadable ones aside. Returns the kept paths, newest first. Every entry is
    verified before it is counted or deleted, so a junk file with a higher step never pushes a
    good checkpoint out."""
    kept: list[Path] = []
    for _, path in reversed(entries):
        reason = problem(path)
        if reason is not None:
            aside(path, reason)
        elif len(kept) < keep_last:
            kept.append(path)
        else:
            remove(path)
    return kept


def remove_orphan_temps(output_dir: str | Path) -> list[Path]:
    """Delete temporary files left by saves that were interrupted (kill -9 mid-write). Call only
    while holding the output-directory lock: a live run's save in progress looks the same."""
    folder = checkpoint_dir(output_dir)
    removed = [p for p in folder.iterdir() if _TEMP.match(p.name)] if folder.is_dir() else []
    for p in removed:
        p.unlink(missing_ok=True)
        log.info("removed %s (left by an interrupted save)", p)
    return removed


def prepare_checkpoint_dir(output_dir: str | Path) -> None:
    """At the start of a run (lock held, main rank only): drop orphan temporaries and set every
    unreadable checkpoint aside, so the newest file on disk is the one resume uses."""
    remove_orphan_temps(output_dir)
    for _, path in list_checkpoints(output_dir):
        reason = checkpoint_problem(path)
        if reason is not None:
            set_aside(path, reason)


def save_checkpoint(state: dict[str, Any], output_dir: str | Path, step: int, keep_last: int) -> Path:
    """Write atomically, then rotate: keep the newest `keep_last` readable checkpoints."""
    path = checkpoint_path(output_dir, step)
    atomic_torch_save(state, path)
    kept = rotate(list_checkpoints(output_dir), keep_last)
    if path not in kept:
        log.warning("the checkpoint just written, %s, is not among the newest readable ones %s", path,
                    [str(p) for p in kept])
    return path


def load_latest_checkpoint(output_dir: str | Path, map_location: str = "cpu") -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that loads and has the required keys; a corrupt or truncated one is
    reported and the previous one is tried (read-only: `prepare_checkpoint_dir` moves them)."""
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            state = load_checkpoint_file(path, map_location=map_location, weights_only=False)
            missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
            if missing:
                raise CheckpointError(f"checkpoint {path} lacks {missing}")
        except (ValueError, OSError) as exc:
            log.warning("skipping unusable checkpoint: %s", exc)
            continue
        return state, path
    return None
