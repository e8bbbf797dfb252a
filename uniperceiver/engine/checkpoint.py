"""Training checkpoints: atomic writes, keep the last K, resume from the newest readable one.

Layout: `<output_dir>/checkpoints/step_<8-digit step>.pt`, a dict with at least `model`,
`optimizer` and `step`, plus `scheduler`, `scaler`, `config` and every rank's RNG states.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from ..utils.io import atomic_torch_save, load_checkpoint_file

log = logging.getLogger(__name__)
_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(output_dir) / f"step_{step:08d}.pt"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(state: dict[str, Any], output_dir: str | Path, step: int, keep_last: int) -> Path:
    """Write atomically, then delete all but the newest `keep_last` checkpoints."""
    path = checkpoint_path(output_dir, step)
    atomic_torch_save(state, path)
    for _, old in list_checkpoints(output_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(output_dir: str | Path, map_location: str = "cpu") -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that loads and has the required keys; a corrupt or truncated one is
    reported and the previous one is tried."""
    for step, path in reversed(list_checkpoints(output_dir)):
        try:
            state = load_checkpoint_file(path, map_location=map_location, weights_only=False)
            missing = [k for k in ("model", "optimizer", "step") if k not in state]
            if missing:
                raise ValueError(f"checkpoint {path} lacks {missing}")
        except (ValueError, OSError) as exc:
            log.warning("skipping unusable checkpoint: %s", exc)
            continue
        return state, path
    return None
