"""Distributed checkpoints (torch.distributed.checkpoint) for sharded runs (FSDP or EP > 1).

Layout: `<output_dir>/checkpoints/step_<8-digit step>/`, a DCP directory (`.metadata` plus one
`__<rank>_0.distcp` file per writing rank) and `checkpoint.json` (format, step, world and
expert-parallel sizes, the run config). Every rank writes its shards into
`step_<step>.partial/`; when all have finished (DCP gathers their results before writing
`.metadata`) rank 0 writes `checkpoint.json` (atomically) and renames the directory to its final
name. So a directory counts only when its name has no suffix AND it holds `.metadata` and a
readable `checkpoint.json` of our format: a job killed mid-write leaves a `.partial` directory
(or, on a filesystem where the rename is not atomic, one without marker) that is never loaded;
the previous checkpoint is used.

Contents (flattened keys): `model.*` and `optimizer.*` from
`torch.distributed.checkpoint.state_dict.get_state_dict` (fully qualified names, sharded
tensors as DTensors: DCP reshards them on load to any other world size, FSDP layout or EP
size), `scheduler`, `scaler`, `trainer` (step, counters) and `rng.rank<r>` (each rank's torch,
numpy, python and CUDA generator states, written by that rank).

Rotation keeps the newest `keep_last` complete directories and deletes older complete ones
only after a newer one is complete; a stale `.partial` directory of an older step (a killed
write) is removed then too. Nothing complete is touched otherwise.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..config import ConfigError
from .checkpoint import checkpoint_dir

log = logging.getLogger(__name__)

FORMAT = "uniperceiver-moe/dcp-v1"
MARKER = "checkpoint.json"
PARTIAL = ".partial"
_NAME = re.compile(r"^step_(\d{8})$")
_PARTIAL_NAME = re.compile(r"^step_(\d{8})\.partial$")


class DcpCheckpointError(ConfigError):
    """A DCP directory that cannot be used for this run (names the directory and the reason):
    bad input, so the CLIs exit 2 with this one line."""


def dcp_path(output_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(output_dir) / f"step_{step:08d}"


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The completion marker of a DCP directory, or None when it is not a complete checkpoint."""
    path = Path(path)
    if not _NAME.match(path.name) or not (path / ".metadata").is_file():
        return None
    try:
        info = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("format") == FORMAT else None


def is_dcp_checkpoint(path: str | Path) -> bool:
    return read_marker(path) is not None


def list_dcp_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete DCP checkpoints, oldest first."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            if is_dcp_checkpoint(p):
                found.append((int(m.group(1)), p))
            else:
                log.warning("ignoring incomplete distributed checkpoint %s (no %s / .metadata)", p, MARKER)
    return sorted(found)


def latest_dcp_checkpoint(output_dir: str | Path) -> tuple[int, Path] | None:
    found = list_dcp_checkpoints(output_dir)
    return found[-1] if found else None


# ------------------------------------------------------------------------------------ writing
def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_dcp(state: dict[str, Any], output_dir: str | Path, step: int, keep_last: int, info: dict[str, Any]) -> Path:
    """Write `state` as the DCP checkpoint of `step` (collective: every rank calls it with its
    own shards), complete it atomically, then rotate. `info` goes into the marker."""
    final = dcp_path(output_dir, step)
    partial = final.with_name(final.name + PARTIAL)
    if _is_main():
        final.parent.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # a killed earlier write of this very step
            shutil.rmtree(partial)
        partial.mkdir()
    _barrier()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: intended
        dcp.save(state, checkpoint_id=str(partial), no_dist=not dist.is_initialized())
    if _is_main():
        marker = {"format": FORMAT, "step": step, **info}
        _atomic_write_text(partial / MARKER, json.dumps(marker, indent=1, sort_keys=True, default=str))
        _fsync_dir(partial)
        if is_dcp_checkpoint(final):
            # This step was saved before (a rerun re-reaching it): the complete one stays, so a
            # valid checkpoint exists at every instant; the new copy is dropped.
            log.warning("%s exists and is complete: keeping it", final)
            shutil.rmtree(partial)
        else:
            if final.exists():  # a marker-less leftover of a killed write under the final name
                shutil.rmtree(final)
            os.replace(partial, final)
        _fsync_dir(final.parent)
        _rotate(output_dir, step, keep_last)
    _barrier()
    return final


def _rotate(output_dir: str | Path, newest: int, keep_last: int) -> None:
    complete = list_dcp_checkpoints(output_dir)
    if not any(s == newest for s, _ in complete):
        return  # never delete anything unless the new checkpoint is complete
    for _, old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for p in checkpoint_dir(output_dir).iterdir():
        m = _PARTIAL_NAME.match(p.name)
        if m and int(m.group(1)) < newest:
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------ reading
def saved_keys(path: str | Path) -> dict[str, Any]:
    """{flattened key: storage metadata} of a DCP directory."""
    return dict(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def load_dcp(state: dict[str, Any], path: str | Path, no_dist: bool = False) -> None:
    """Fill `state` (tensors, DTensors and objects, laid out for THIS run) in place from `path`;
    DCP reshards whatever layout wrote it. Shape mismatches name the key."""
    try:
        with warnings.catch_warnings():
            # "torch.distributed is ... uninitialized, assuming ... a single process": intended.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
    except Exception as exc:  # DCP raises CheckpointException wrapping every rank's failure
        raise DcpCheckpointError(f"distributed checkpoint {path} does not fit this run: {exc}") from exc


def check_model_fits(model_sd: dict[str, Any], keys: dict[str, Any], path: str | Path) -> None:
    """Every model tensor of this run exists in the checkpoint with the same global shape (the
    layout may differ: DCP reshards); else one error listing what does not fit."""
    missing, shapes, unexpected = [], [], []
    for name, t in model_sd.items():
        meta = keys.get(f"model.{name}")
        if meta is None:
            missing.append(name)
        elif isinstance(meta, TensorStorageMetadata) and tuple(meta.size) != tuple(t.shape):
            shapes.append(f"{name}: checkpoint {tuple(meta.size)} vs model {tuple(t.shape)}")
    unexpected = sorted(k[len("model."):] for k in keys if k.startswith("model.") and k[len("model."):] not in model_sd)
    if missing or shapes or unexpected:
        parts = [f"{title} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                 for title, items in (("missing", missing), ("wrong shape", shapes), ("unexpected", unexpected)) if items]
        raise DcpCheckpointError(f"distributed checkpoint {path} does not match this run's model: " + "; ".join(parts))


def prune_to_saved(template: dict[str, Any], keys: set[str] | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`template` without the entries the checkpoint lacks (DCP's flattened key names). A fresh
    optimizer has states for every parameter; a saved one only for those that ever had a
    gradient, which is what a resumed run must continue from."""
    out: dict[str, Any] = {}
    for k, v in template.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            sub = prune_to_saved(v, keys, name + ".")
            if sub or not v:
                out[k] = sub
        elif name in keys or any(key.startswith(name + ".") for key in keys):
            out[k] = v
    return out


def rng_key(rank: int) -> str:
    return f"rank{rank:05d}"


def rng_blob(rng: dict[str, Any]) -> io.BytesIO:
    """One rank's generator states as one opaque item (torch.save'd)."""
    buf = io.BytesIO()
    torch.save(rng, buf)
    buf.seek(0)
    return buf


def consolidate_model_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(full model state dict with every expert, run config) of a DCP checkpoint, read in this
    process alone whatever world size wrote it."""
    path = Path(path)
    if read_marker(path) is None and (latest := latest_dcp_checkpoint(path)) is not None:
        path = latest[1]  # a run's output directory: its newest complete checkpoint
    info = read_marker(path)
    if info is None:
        raise DcpCheckpointError(
            f"{path} is not a complete distributed checkpoint (expected a step_<8 digits> directory "
            f"with .metadata and {MARKER}; a .partial or marker-less directory is a killed write)"
        )
    template: dict[str, Any] = {}
    for key, meta in saved_keys(path).items():
        if not key.startswith("model."):
            continue
        name = key[len("model."):]
        if isinstance(meta, TensorStorageMetadata):
            template[name] = torch.empty(meta.size, dtype=meta.properties.dtype)
        elif isinstance(meta, BytesStorageMetadata):
            template[name] = None  # an object entry (a module's extra state): DCP fills it in
        else:
            raise DcpCheckpointError(f"{path}: unexpected entry {key!r} ({type(meta).__name__})")
    if not template:
        raise DcpCheckpointError(f"{path}: the checkpoint holds no model weights")
    state = {"model": template}
    load_dcp(state, path, no_dist=True)
    return state["model"], info.get("config") or {}


# ------------------------------------------------------------------------------ the trainer
def _trainer_state(trainer) -> dict[str, Any]:
    """The trainer's state laid out for DCP (the model and optimizer as this run shards them)."""
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    return {
        "model": model_sd,
        "optimizer": optim_sd,
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "trainer": {"step": trainer.step, "nonfinite_total": trainer.nonfinite_total},
    }


def save_trainer(trainer) -> Path:
    """Write the trainer's DCP checkpoint for its current step (collective)."""
    from ..config import to_dict

    state = _trainer_state(trainer)
    state["rng"] = {rng_key(trainer.rank): rng_blob(trainer._rng_state())}
    tcfg = trainer.cfg.train
    info = {"world_size": trainer.world, "expert_parallel_size": getattr(tcfg, "expert_parallel_size", 1),
            "fsdp": tcfg.fsdp, "config": to_dict(trainer.cfg)}
    return save_dcp(state, trainer.output_dir, trainer.step, tcfg.keep_last, info)


def resume_trainer(trainer, path: Path) -> None:
    """Load a DCP checkpoint into the trainer, whatever world size / FSDP / EP layout wrote it.
    RNG states are restored when the world size is the same (bit-exact resume); otherwise each
    rank is reseeded (a warning says so)."""
    info = read_marker(path) or {}
    saved_cfg = (info.get("config") or {}).get("model")
    if saved_cfg is not None:
        from ..config import to_dict

        ours = to_dict(trainer.cfg.model)
        differs = sorted(k for k in set(ours) | set(saved_cfg) if ours.get(k) != saved_cfg.get(k))
        if differs:
            log.warning("checkpoint %s was written with other model settings: %s", path, differs)
    keys = saved_keys(path)
    state = _trainer_state(trainer)
    check_model_fits(state["model"], keys, path)
    state["optimizer"] = prune_to_saved(state["optimizer"], keys, "optimizer.")
    own_rng = f"rng.{rng_key(trainer.rank)}"
    same_world = info.get("world_size") == trainer.world and own_rng in keys
    if same_world:
        state["rng"] = {rng_key(trainer.rank): None}
    load_dcp(state, path, no_dist=not dist.is_initialized())
    set_model_state_dict(trainer.model, state["model"])
    # strict=False: parameters that never had a gradient have no saved state ...
    set_optimizer_state_dict(trainer.model, trainer.optimizer, state["optimizer"],
                             options=StateDictOptions(strict=False))
    # ... and must have none now (not the zeros a fresh state dict starts from), or AdamW's
    # step count and bias correction would differ from the uninterrupted run.
    saved_states = set((state["optimizer"].get("state") or {}).keys())
    for name, param in trainer.model.named_parameters():
        if name not in saved_states:
            trainer.optimizer.state.pop(param, None)
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.step = int(state["trainer"]["step"])
    trainer.nonfinite_total = int(state["trainer"]["nonfinite_total"])
    if same_world:
        blob = state["rng"][rng_key(trainer.rank)]
        rng = torch.load(blob, weights_only=False) if isinstance(blob, io.BytesIO) else blob
        trainer._set_rng_state(rng)
    else:
        log.warning("checkpoint %s was written by %s ranks, this run has %d: reseeding the RNGs",
                    path, info.get("world_size"), trainer.world)


def consolidate(path: str | Path, out: str | Path) -> str:
    """Write the single-file model ({'format', 'config', 'model'} with every expert) of a DCP
    checkpoint, loadable by UniPerceiver.from_pretrained, uniperceiver.eval and the API; the
    model config is checked against the weights by building the model and loading strictly."""
    from ..config import ModelConfig, from_dict
    from ..modeling.checkpoint import load_state_dict_strict
    from ..modeling.model import CHECKPOINT_FORMAT, UniPerceiver
    from ..utils.io import atomic_torch_save

    state, run_cfg = consolidate_model_state(path)
    if read_marker(path) is None and (latest := latest_dcp_checkpoint(path)) is not None:
        path = latest[1]
    model_cfg = from_dict(ModelConfig, run_cfg.get("model") or {}, source=f"{path}/{MARKER}:config.model")
    model = UniPerceiver(model_cfg)
    load_state_dict_strict(model, state, source=str(path))
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "config": run_cfg["model"], "model": state}, out)
    info = read_marker(path) or {}
    return (f"consolidated step {info.get('step')} (written by {info.get('world_size')} ranks, "
            f"expert_parallel_size={info.get('expert_parallel_size')}, fsdp={info.get('fsdp')}): "
            f"{len(state)} tensors")
