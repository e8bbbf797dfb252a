"""Errors raised by the data layer.

Every error names the file it comes from and, where the sample was listed in an annotation file,
that file and its (1-based) line number, so a bad entry in a million-line list can be found.
"""
from __future__ import annotations

from ..utils.errors import BadInput


class DataError(ValueError, BadInput):
    """A malformed annotation entry, or media that cannot be read.

    `file` is the file at fault (the annotation file for a malformed entry, the image/video for a
    media error); `annotation` / `line` point at the entry that listed it, where known.
    """

    def __init__(self, message: str, *, file: str | None = None, annotation: str | None = None,
                 line: int | None = None) -> None:
        super().__init__(message)
        self.file = file
        self.annotation = annotation
        self.line = line


class MediaError(DataError):
    """An image or video that is missing, corrupt or undecodable (skippable with `on_error: skip`)."""


def where(annotation: str | None, line: int | None) -> str:
    """' (listed at ann.txt:12)' or '' when the sample did not come from an annotation line."""
    if annotation is None:
        return ""
    return f" (listed at {annotation}:{line})" if line is not None else f" (listed in {annotation})"


def malformed(annotation: str, line: int, what: str) -> DataError:
    """The error for a malformed annotation line: `file:line: what`."""
    return DataError(f"{annotation}:{line}: {what}", file=annotation, annotation=annotation, line=line)
