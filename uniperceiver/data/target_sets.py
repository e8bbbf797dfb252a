"""Shared candidate sets encoded by the model (OFFICIAL.md 3.3): class names, the vocabulary,
verbalisers.

- class names / verbalisers: one class per line of a text file (or an inline list); `a|b` lists
  synonyms. Each name is encoded as `name + " <|endoftext|>"` (no prompt template), e.g.
  `tench` -> [1149, 634, 49407]. In training one synonym per class is drawn per step from the
  step's seed (`get(seed)`); in evaluation (`get()`) the first synonym is used.
- vocabulary: the 49,411 sequences `[v, <|endoftext|>]` for v in 0..49410 (specials included).
Rows are right-padded with 0, `padding_mask` True at padding; the set carries the attribute row
of its kind (`modeling.attributes.target_set_attributes`).
"""
from __future__ import annotations

import random

import torch

from ..config.schema import TargetSetConfig, resolve_path
from ..modeling.attributes import target_set_attributes
from ..modeling.batch import TargetSet
from ..tokenization import ClipTokenizer, pad_ids
from .errors import DataError
from .datasets.base import read_lines

__all__ = ["TargetSetSource", "build_target_set", "read_class_names", "vocabulary_target_set"]


def vocabulary_target_set(vocab_size: int = ClipTokenizer.vocab_size, token_ids: list[int] | None = None,
                          name: str = "Vocab_Word") -> TargetSet:
    """The Vocab_Word set: `[v, <|endoftext|>]` for every id v < vocab_size (encoded as
    [SPE, v, EOT]), or only for `token_ids` (a vocabulary subset; `token_ids_N` maps its rows to
    token ids)."""
    tokens = torch.arange(vocab_size) if token_ids is None else torch.tensor(token_ids)
    ids = torch.stack([tokens, torch.full_like(tokens, ClipTokenizer.EOT)], dim=1)
    return TargetSet(name, ids, None, attributes_SA=target_set_attributes("vocabulary"),
                     token_ids_N=None if token_ids is None else tokens)


def read_class_names(path: str) -> list[list[str]]:
    """Class names, one class per line, `a|b` = synonyms (first = canonical). Blank lines are errors
    (they would shift every later class index); a trailing newline is fine."""
    lines = read_lines(path, "class-name file")
    while lines and not lines[-1].strip():
        lines.pop()
    classes = []
    for no, line in enumerate(lines, start=1):
        names = [n.strip() for n in line.split("|") if n.strip()]
        if not names:
            raise DataError(f"{path}:{no}: empty class name (one class per line; 'a|b' for synonyms)",
                            file=path, annotation=path, line=no)
        classes.append(names)
    if not classes:
        raise DataError(f"class-name file {path} is empty", file=path)
    return classes


def read_token_ids(path: str, vocab_size: int) -> list[int]:
    """Token ids of a vocabulary subset: whitespace-separated integers in [0, vocab_size)."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as exc:
        raise DataError(f"vocabulary id file {path} cannot be read: {exc}", file=path) from exc
    ids: set[int] = set()
    for no, line in enumerate(lines, 1):
        for word in line.split():
            if not word.isdigit() or int(word) >= vocab_size:
                raise DataError(f"{path}:{no}: expected token ids in [0, {vocab_size}), got {word!r}",
                                file=path, line=no)
            ids.add(int(word))
    if not ids:
        raise DataError(f"vocabulary id file {path} lists no token ids", file=path)
    return sorted(ids)


class TargetSetSource:
    """Builds the `TargetSet` of one configured set; `len()` is the number of candidates."""

    def __init__(self, name: str, kind: str, tokenizer: ClipTokenizer, classes: list[list[str]] | None = None,
                 source: str = "", vocab_ids: list[int] | None = None) -> None:
        self.name = name
        self.kind = kind
        self.source = source  # where the names came from (for messages)
        self.attributes = target_set_attributes(kind)
        self.classes = classes
        self._cached: TargetSet | None = None
        self.token_ids: torch.Tensor | None = None
        if kind == "vocabulary":
            vocab = vocabulary_target_set(tokenizer.vocab_size, vocab_ids, name)
            self.token_ids = vocab.token_ids_N
            self._fixed = (vocab.ids_NL, None)
            self._synonyms: list[list[list[int]]] = []
        else:
            if not classes:
                raise ValueError(f"target set {name!r}: no class names")
            self._synonyms = [[tokenizer.encode(n + " <|endoftext|>") for n in names] for names in classes]
            self._fixed = None

    def __len__(self) -> int:
        return self._fixed[0].shape[0] if self._fixed is not None else len(self._synonyms)

    @property
    def has_synonyms(self) -> bool:
        return any(len(s) > 1 for s in self._synonyms)

    def get(self, seed: int | None = None, task_id: int = 0) -> TargetSet:
        """The set's sequences: first synonyms (`seed=None`), or one synonym per class drawn from `seed`."""
        if self._fixed is not None:
            ids, mask = self._fixed
            return TargetSet(self.name, ids, mask, self.attributes.clone(), task_id, token_ids_N=self.token_ids)
        if seed is None or not self.has_synonyms:
            if self._cached is None:
                self._cached = self._build([s[0] for s in self._synonyms])
            cached = self._cached
            return TargetSet(self.name, cached.ids_NL, cached.padding_mask_NL, self.attributes.clone(), task_id)
        rng = random.Random(int(seed))
        chosen = [s[rng.randrange(len(s))] if len(s) > 1 else s[0] for s in self._synonyms]
        out = self._build(chosen)
        out.task_id = task_id
        return out

    def _build(self, seqs: list[list[int]]) -> TargetSet:
        ids, mask = pad_ids(seqs)
        return TargetSet(self.name, ids, mask, self.attributes.clone())


def build_target_set(name: str, cfg: TargetSetConfig, tokenizer: ClipTokenizer, data_root: str = "") -> TargetSetSource:
    """The source of one `target_sets:` entry of the run config."""
    if cfg.kind == "vocabulary":
        if cfg.file is None:
            return TargetSetSource(name, "vocabulary", tokenizer, source="vocabulary")
        path = resolve_path(cfg.file, data_root)
        return TargetSetSource(name, "vocabulary", tokenizer, source=path,
                               vocab_ids=read_token_ids(path, tokenizer.vocab_size))
    if cfg.file is not None:
        path = resolve_path(cfg.file, data_root)
        return TargetSetSource(name, cfg.kind, tokenizer, read_class_names(path), source=path)
    classes = []
    for i, entry in enumerate(cfg.names or []):
        names = [n.strip() for n in str(entry).split("|") if n.strip()]
        if not names:
            raise ValueError(f"target set {name!r}: names[{i}] is empty")
        classes.append(names)
    return TargetSetSource(name, cfg.kind, tokenizer, classes, source=f"target_sets.{name}.names")
