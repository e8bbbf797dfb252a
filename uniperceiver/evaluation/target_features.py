"""Encoding shared target sets (class names, the 49,411-entry vocabulary) once per evaluation.

`TargetFeatures.get(target_set)` encodes a set in chunks of `chunk_size` sequences with a progress
bar (rank 0), keeps the unit-norm features in memory for the rest of the run (a set shared by
several tasks, like the vocabulary of COCO and MSVD captioning, is encoded once), and, with a
`cache_dir`, stores them on disk under a key made of the model identity (checkpoint file hash +
model config) and the set's content (token ids, padding, attribute row, task id), so a second
evaluation of the same checkpoint skips the encoding. A changed checkpoint or class list changes
the key; stale entries are never reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ..modeling.batch import TargetSet
from ..modeling.model import UniPerceiver
from ..utils.io import atomic_torch_save

__all__ = ["TargetFeatures", "file_sha256", "model_fingerprint", "target_set_fingerprint"]

log = logging.getLogger(__name__)


def file_sha256(path: str | os.PathLike, block: int = 1 << 24) -> str:
    """sha256 of a file; of a directory (a distributed checkpoint), of its files' names and
    contents in name order."""
    h = hashlib.sha256()
    paths = sorted(p for p in Path(path).iterdir() if p.is_file()) if os.path.isdir(path) else [Path(path)]
    for p in paths:
        if os.path.isdir(path):
            h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(block):
                h.update(chunk)
    return h.hexdigest()


def _tensor_digest(h: "hashlib._Hash", t: Tensor | None) -> None:
    if t is None:
        h.update(b"none")
        return
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def model_fingerprint(model: UniPerceiver, checkpoint_sha256: str | None = None) -> str:
    """sha256 of the checkpoint file's hash (or, without one, of the state dict) and the model
    config."""
    from ..config import to_dict

    h = hashlib.sha256()
    if checkpoint_sha256 is not None:
        h.update(checkpoint_sha256.encode())
    else:
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            _tensor_digest(h, t)
    h.update(json.dumps(to_dict(model.cfg), sort_keys=True, default=str).encode())
    return h.hexdigest()


def target_set_fingerprint(target_set: TargetSet) -> str:
    h = hashlib.sha256()
    _tensor_digest(h, target_set.ids_NL)
    _tensor_digest(h, target_set.padding_mask_NL)
    _tensor_digest(h, target_set.attributes_SA)
    h.update(str(target_set.task_id).encode())
    return h.hexdigest()


class TargetFeatures:
    """In-memory (and optionally on-disk) store of encoded target sets for one model."""

    def __init__(
        self,
        model: UniPerceiver,
        *,
        chunk_size: int = 4096,
        cache_dir: str | os.PathLike | None = None,
        model_key: str | Callable[[], str] | None = None,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.chunk_size = max(1, int(chunk_size))
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self._model_key = model_key
        self.progress = progress
        self._memo: dict[str, Tensor] = {}
        self.encoded: list[str] = []  # names of the sets actually run through the encoder
        self.loaded: list[str] = []  # names of the sets read from the disk cache

    def model_key(self) -> str:
        if callable(self._model_key):  # hashing a multi-GB checkpoint only when a cache needs it
            self._model_key = self._model_key()
        if self._model_key is None:
            self._model_key = model_fingerprint(self.model)
        return self._model_key

    def _cache_path(self, content_key: str) -> str:
        assert self.cache_dir is not None
        key = hashlib.sha256((self.model_key() + content_key).encode()).hexdigest()[:32]
        return os.path.join(self.cache_dir, f"targets-{key}.pt")

    @torch.no_grad()
    def encode(self, target_set: TargetSet) -> Tensor:
        """Run the set through the model in chunks -> unit-norm features [N, D] (model device)."""
        from tqdm import tqdm

        self.encoded.append(target_set.name)
        n = len(target_set)
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        feats = []
        bar = tqdm(total=n, desc=f"encoding target set {target_set.name}", unit="seq",
                   disable=not self.progress, leave=False, dynamic_ncols=True)
        try:
            for start in range(0, n, self.chunk_size):
                stop = min(start + self.chunk_size, n)
                seq = target_set.slice(start, stop).to(device)
                feats.append(self.model.features(self.model.encode(seq).hidden_BLD[:, 0]))
                bar.update(stop - start)
        finally:
            bar.close()
            self.model.train(was_training)
        return torch.cat(feats) if feats else torch.zeros(0, self.model.cfg.d_model, device=device)

    def get(self, target_set: TargetSet) -> Tensor:
        content_key = target_set_fingerprint(target_set)
        if content_key in self._memo:
            return self._memo[content_key]
        device = next(self.model.parameters()).device
        path = None if self.cache_dir is None else self._cache_path(content_key)
        feats = None
        if path is not None and os.path.isfile(path):
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                if blob.get("content") == content_key and blob["features"].shape[0] == len(target_set):
                    feats = blob["features"].to(device)
                    self.loaded.append(target_set.name)
            except Exception as e:  # a corrupt cache entry is re-encoded, never fatal
                log.warning("ignoring unreadable target-set cache %s (%s)", path, e)
        if feats is None:
            feats = self.encode(target_set)
            if path is not None:
                try:
                    atomic_torch_save({"content": content_key, "name": target_set.name,
                                       "features": feats.detach().cpu()}, path)
                except OSError as e:
                    log.warning("could not write target-set cache %s (%s)", path, e)
        self._memo[content_key] = feats
        return feats
