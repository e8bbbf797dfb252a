"""GLUE-style text classification from a TSV file, with the release's prompts (OFFICIAL.md 4.2).

`annotations` is the TSV file (or a folder holding `{split}.tsv`). Columns default to
`sentence[<TAB>sentence2]<TAB>label`; set `options.sentence_columns` (0-based list) and
`options.label_column` for other layouts, `options.skip_header: true` to drop a header line.
Labels are integers (`1`, `0.0`) or names from `options.label_names` (a list; its position is the
class index).

The prompt comes from `options.template` (with `{s1}`, `{s2}` and one `<|spe|>`), or from
`options.task` naming a GLUE task (defaults below, from the release); the output at `<|spe|>` is
classified against the task's verbaliser target set. Samples: `ids`, `spe_index`, `label`, `id`
(the line number).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config.schema import DataSourceConfig
from ...tokenization import ClipTokenizer
from ..text import build_prompt
from .base import BaseDataset, LineErrors, Record, option, pick_file, read_lines

# task -> (template, drop a final '.' of the first sentence, default label names)
GLUE_PROMPTS: dict[str, tuple[str, bool, list[str] | None]] = {
    "SST-2": ("{s1} <|endoftext|> It is <|spe|>. <|endoftext|>", False, None),
    "CoLA": ("{s1} This is <|spe|>. <|endoftext|>", False, None),
    "RTE": ("{s1} ? <|endoftext|> it is <|spe|> , {s2} <|endoftext|>", True, ["not_entailment", "entailment"]),
    "MRPC": ("{s1} . <|spe|> , {s2} <|endoftext|>", True, None),
    "QQP": ("{s1} <|endoftext|> <|spe|> , {s2} <|endoftext|>", True, None),
    "QNLI": ("{s1} <|endoftext|> it is <|spe|> , {s2} <|endoftext|>", True, ["not_entailment", "entailment"]),
    "MNLI": ("{s1} <|spe|> , {s2} <|endoftext|>", False, ["contradiction", "neutral", "entailment"]),
}


@dataclass
class GlueOptions:
    task: str | None = option(None, f"a GLUE task ({', '.join(GLUE_PROMPTS)}): its prompt, label names and "
                                    "period rule as defaults")
    template: str | None = option(None, "the prompt, with `{s1}`[, `{s2}`] and one `<|spe|>` (default: the task's, "
                                        "else the SST-2 / MNLI one by sentence count)")
    skip_header: bool = option(False, "drop the TSV's first line")
    sentence_columns: list[int] | None = option(None, "0-based sentence columns (default: all but the last)")
    label_column: int = option(-1, "0-based label column")
    label_names: list[str] | None = option(None, "label names in class order, for name labels (default: the task's)")
    strip_period: bool | None = option(None, "drop a final '.' of the first sentence (default: the task's rule)")

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in GLUE_PROMPTS:
            raise ValueError(f"options.task {self.task!r} is not one of {sorted(GLUE_PROMPTS)}")


class GlueDataset(BaseDataset):
    Options = GlueOptions

    def __init__(self, source: DataSourceConfig, tokenizer: ClipTokenizer, training: bool, *, max_len: int,
                 data_root: str = "") -> None:
        super().__init__(source, training, data_root, name=f"glue[{source.split}]")
        self.tokenizer = tokenizer
        self.max_len = max_len
        opts = self.options
        task = opts.task
        ann_file = pick_file(self.annotations or self.root, [f"{source.split}.tsv"], "GLUE TSV")
        lines = read_lines(ann_file, "GLUE TSV")
        first = 1 if opts.skip_header else 0
        sentence_cols = opts.sentence_columns
        label_col = opts.label_column
        default_template, strip, default_names = GLUE_PROMPTS.get(task or "", (None, False, None))
        self.label_names: list[str] | None = opts.label_names if opts.label_names is not None else default_names
        self.strip_period = opts.strip_period if opts.strip_period is not None else strip
        errors = LineErrors(source.on_error)
        records = []
        for no, line in enumerate(lines[first:], start=first + 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            cols = sentence_cols if sentence_cols is not None else list(range(len(fields) - 1))
            try:
                sentences = [fields[c] for c in cols]
                label_text = fields[label_col].strip()
            except (IndexError, TypeError):
                errors.report(ann_file, no, f"expected sentence columns {cols} and label column {label_col} "
                                            f"(tab-separated), got {len(fields)} field(s): {line[:200]!r}")
                continue
            label = self._label(label_text)
            if not sentences or label is None:
                what = "no sentence column" if not sentences else (
                    f"label {label_text!r} is not an integer >= 0"
                    + (f" nor one of {self.label_names}" if self.label_names else ""))
                errors.report(ann_file, no, f"{what}: {line[:200]!r}")
                continue
            records.append(Record({"sentences": sentences, "label": label, "id": no}, ann_file, no))
        self._finish(records, errors)
        n_sent = len(self.records[0].data["sentences"])
        self.template = opts.template or default_template or (
            GLUE_PROMPTS["SST-2"][0] if n_sent == 1 else GLUE_PROMPTS["MNLI"][0])
        for k in range(n_sent):
            if f"{{s{k + 1}}}" not in self.template:
                raise ValueError(f"{self.name}: template {self.template!r} lacks {{s{k + 1}}} for sentence {k + 1}")

    def _label(self, text: str) -> int | None:
        if self.label_names and text in self.label_names:
            return self.label_names.index(text)
        try:
            value = float(text)
        except ValueError:
            return None
        return int(value) if value.is_integer() and value >= 0 else None

    def labels(self) -> list[int]:
        return [r.data["label"] for r in self.records]

    def load(self, record: Record, index: int) -> dict[str, Any]:
        d = record.data
        ids, spe_index = build_prompt(self.tokenizer, self.template, d["sentences"], self.max_len, self.strip_period)
        return {"ids": ids, "spe_index": spe_index, "label": d["label"], "id": d["id"]}


__all__ = ["GLUE_PROMPTS", "GlueDataset"]
