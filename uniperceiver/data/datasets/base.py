"""What every reader shares: (index, seed) indexing, per-sample RNG, `on_error` handling.

A reader is a list of records parsed at construction (malformed lines raise, or are skipped and
counted in `skipped_lines` with `on_error: skip`) and a `load(record) -> sample dict` that reads
the media. With `on_error: skip`, a record whose media cannot be read is replaced by the next
readable one (index + 1, + 2, ..., same seed, so the choice is deterministic); `skipped` counts
them in this process, the sample carries `skipped: n` so the collate can report the count from
worker processes too (`TaskBatch.meta['skipped']`), and each one is logged.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch.utils.data import Dataset

from ...config.loader import from_dict
from ...config.schema import DataSourceConfig, resolve_path
from ..errors import DataError, MediaError, malformed
from ..rng import sample_rng, split_index

logger = logging.getLogger("uniperceiver.data")
O = TypeVar("O")


def option(default: Any, doc: str, *, path: bool = False) -> Any:
    """A reader option: its default and the one line the options table (README) shows. `path`:
    a file path, resolved like `root` (so an unset $DATA_PATH in it fails before any work)."""
    return field(default=default, metadata={"doc": doc, "path": path})


@dataclass
class NoOptions:
    """The options of a format that takes none."""


def read_options(cls: type[O], source: DataSourceConfig, path: str = "options", where: str | None = None) -> O:
    """`source.options` as the reader's typed options `cls`, validated like the rest of the config:
    an unknown key is a ConfigError naming it (`path`.key, from `where`) with a suggestion."""
    if isinstance(source.options, cls):
        return source.options
    return from_dict(cls, source.options, path=path, source=where)


@dataclass
class Record:
    """One sample as listed in an annotation file."""

    data: dict[str, Any]
    annotation: str | None = None  # the file that listed it
    line: int | None = None  # 1-based line in that file
    extra: dict[str, Any] = field(default_factory=dict)


class LineErrors:
    """Collects malformed annotation lines: raises at once, or counts them (`on_error: skip`)."""

    def __init__(self, on_error: str) -> None:
        self.on_error = on_error
        self.count = 0
        self.first: DataError | None = None

    def report(self, annotation: str, line: int, what: str) -> None:
        err = malformed(annotation, line, what)
        if self.on_error == "raise":
            raise err
        self.count += 1
        if self.first is None:
            self.first = err

    def log_summary(self, name: str) -> None:
        if self.count:
            logger.warning("%s: skipped %d malformed annotation line(s); first: %s", name, self.count, self.first)


class BaseDataset(Dataset):
    """Records + `load(record, index)`; `__getitem__` accepts an int or `(index, seed)`.
    `Options` is the dataclass of the format's `options` (read into `self.options`)."""

    Options: type = NoOptions

    def __init__(self, source: DataSourceConfig, training: bool, data_root: str = "", name: str = "") -> None:
        self.source = source
        self.options = read_options(self.Options, source)
        self.training = training
        self.data_root = data_root
        self.name = name or source.format
        self.on_error = source.on_error
        self.records: list[Record] = []
        self.skipped = 0  # unreadable media replaced at getitem time (this process)
        self.skipped_lines = 0  # malformed annotation lines left out at load time
        # Number of classes the data defines itself (Kinetics category mapping, a jsonl class-name
        # file); None where only the labels are known. Evaluators compare it with the target set.
        self.num_classes: int | None = None

    # ------------------------------------------------------------------ paths
    def path(self, value: str) -> str:
        return resolve_path(value, self.data_root) if value else ""

    @property
    def root(self) -> str:
        return self.path(self.source.root)

    @property
    def annotations(self) -> str:
        return self.path(self.source.annotations)

    def _finish(self, records: list[Record], errors: LineErrors | None = None) -> None:
        if errors is not None:
            self.skipped_lines = errors.count
            errors.log_summary(self.name)
        if self.source.limit is not None:
            records = records[: self.source.limit]
        if not records:
            raise DataError(f"{self.name}: no samples found (split {self.source.split!r}, "
                            f"annotations {self.annotations or '-'}, root {self.root or '-'})")
        self.records = records

    # --------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.records)

    def load(self, record: Record, index: int) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        idx, seed = split_index(index)
        n = len(self.records)
        if not -n <= idx < n:
            raise IndexError(f"{self.name}: index {idx} out of range for {n} samples")
        idx %= n
        skipped = 0
        for attempt in range(n):
            j = (idx + attempt) % n
            record = self.records[j]
            try:
                with sample_rng(seed):
                    sample = self.load(record, j)
            except MediaError as err:
                if self.on_error == "raise":
                    raise
                skipped += 1
                self.skipped += 1
                logger.warning("%s: skipping sample %d: %s (%d skipped so far in this process)",
                               self.name, j, err, self.skipped)
                continue
            if skipped:
                sample["skipped"] = skipped
            return sample
        raise DataError(f"{self.name}: none of the {n} samples could be read (on_error: skip)")

    # -------------------------------------------------------------- labels
    def labels(self) -> list[int] | None:
        """Every sample's class index, where the reader knows them without reading media."""
        return None

    def check_num_classes(self, num_classes: int, what: str = "the target set") -> None:
        """Fail clearly when a label does not index a candidate of the task's target set."""
        labels = self.labels()
        if labels is None:
            return
        bad = [(r, lab) for r, lab in zip(self.records, labels) if not 0 <= lab < num_classes]
        if bad:
            rec, lab = bad[0]
            at = f" at {rec.annotation}:{rec.line}" if rec.annotation else ""
            raise DataError(
                f"{self.name}: label {lab}{at} does not index {what}, which has {num_classes} names "
                f"({len(bad)} sample(s) out of range, largest label {max(lab for _, lab in bad)}); "
                "the class-name file and the annotations disagree",
                annotation=rec.annotation, line=rec.line,
            )


def read_lines(path: str, what: str) -> list[str]:
    """Lines of a text file (without newlines); a missing file is a `DataError` naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"{what} {path} not found", file=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}", file=path) from exc


def pick_file(path: str, default_names: list[str], what: str) -> str:
    """`path` if it is a file; else the first of `default_names` inside it that exists."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in default_names:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise DataError(f"{what}: none of {default_names} found in {path}", file=path)
    raise DataError(f"{what} {path or '(empty path)'} not found", file=path)
