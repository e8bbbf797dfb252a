"""Masked-language-modelling corpus (the release's `GeneralCorpusDataset`, OFFICIAL.md 4.2).

`annotations` (or `root`) is a plain-text file (or several joined with '+'); every non-empty line
is a sample start. Sample i takes line i and the following lines (wrapping around) until at
least `options.min_words` (default 128) basic words are collected, each line followed by
`<|endoftext|>`; whole words are masked with p = `task.mlm_probability` (-> `<|spe|>` 80 %,
random ids 10 %, unchanged 10 %), and the ids are truncated to `task.max_text_len`, keeping the
last one. Samples: `ids`, `mlm_labels` (original id at picked positions, -1 elsewhere), `id`.

Lines are not held in memory: their byte offsets are (8 bytes a line), and each worker reads
lines from its own file handle.
"""
from __future__ import annotations

import os
from array import array
from typing import Any

from dataclasses import dataclass

from ...config.schema import DataSourceConfig
from ...tokenization import ClipTokenizer
from ..errors import DataError
from ..text import mask_words, split_words, truncate_keep_last
from .base import BaseDataset, Record, option


@dataclass
class MLMCorpusOptions:
    min_words: int = option(128, "a sample joins lines until it holds at least this many basic words")

    def __post_init__(self) -> None:
        if self.min_words < 1:
            raise ValueError(f"options.min_words must be >= 1, got {self.min_words}")


class MLMCorpusDataset(BaseDataset):
    Options = MLMCorpusOptions

    def __init__(self, source: DataSourceConfig, tokenizer: ClipTokenizer, training: bool, *, max_len: int,
                 probability: float = 0.15, data_root: str = "") -> None:
        super().__init__(source, training, data_root, name=f"mlm_corpus[{source.split}]")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.probability = probability
        self.min_words = self.options.min_words
        spec = source.annotations or source.root
        self.files = [self.path(p) for p in spec.split("+")] if spec else []
        if not self.files:
            raise DataError(f"{self.name}: set `annotations` to the corpus text file")
        # (file index, byte offset, byte length) of every non-empty line, 1-based line numbers
        self._file_idx = array("l")
        self._offsets = array("q")
        self._lengths = array("l")
        self._line_no = array("l")
        for f_idx, path in enumerate(self.files):
            if not os.path.isfile(path):
                raise DataError(f"MLM corpus {path} not found", file=path)
            offset = 0
            with open(path, "rb") as fh:
                for no, raw in enumerate(fh, start=1):
                    if raw.strip():
                        self._file_idx.append(f_idx)
                        self._offsets.append(offset)
                        self._lengths.append(len(raw))
                        self._line_no.append(no)
                    offset += len(raw)
        n = len(self._offsets)
        if source.limit is not None:
            n = min(n, source.limit)
        if n == 0:
            raise DataError(f"{self.name}: corpus {' + '.join(self.files)} has no non-empty line")
        self._n = n
        self._handles: dict[int, Any] = {}
        self._pid = -1

    def __len__(self) -> int:
        return self._n

    def __getstate__(self) -> dict[str, Any]:  # file handles do not cross process boundaries
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def line(self, i: int) -> str:
        """The text of non-empty line i."""
        if self._pid != os.getpid():  # a forked worker gets its own handles
            self._handles, self._pid = {}, os.getpid()
        f_idx = self._file_idx[i]
        fh = self._handles.get(f_idx)
        if fh is None:
            fh = self._handles[f_idx] = open(self.files[f_idx], "rb")
        fh.seek(self._offsets[i])
        raw = fh.read(self._lengths[i])
        try:
            return raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.files[f_idx]}:{self._line_no[i]}: not UTF-8 text: {exc}",
                            file=self.files[f_idx], annotation=self.files[f_idx], line=self._line_no[i]) from exc

    def words(self, index: int) -> list[list[int]]:
        """Basic words of lines index, index + 1, ... (each line + EOT) until min_words."""
        words: list[list[int]] = []
        cur = index
        for _ in range(self._n):
            line_words = split_words(self.tokenizer, self.line(cur))
            if line_words:
                words += line_words + [[self.tokenizer.EOT]]
            if len(words) >= self.min_words:
                break
            cur = (cur + 1) % self._n
        return words

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        # Text is never "unreadable media": no skip loop; the base class handles the RNG.
        from ..rng import sample_rng, split_index

        idx, seed = split_index(index)
        if not -self._n <= idx < self._n:
            raise IndexError(f"{self.name}: index {idx} out of range for {self._n} samples")
        idx %= self._n
        with sample_rng(seed):
            ids, labels = mask_words(self.words(idx), self.probability, len(self.tokenizer))
        return {
            "ids": truncate_keep_last(ids, self.max_len),
            "mlm_labels": truncate_keep_last(labels, self.max_len),
            "id": idx,
        }

    def load(self, record: Record, index: int) -> dict[str, Any]:  # pragma: no cover - unused
        raise NotImplementedError
