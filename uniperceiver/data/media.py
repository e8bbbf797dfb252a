"""Reading images and decoding videos, with errors that name the file and its annotation line."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .errors import MediaError, where

__all__ = ["VIDEO_EXTENSIONS", "load_image", "read_video_frames", "resolve_video_path", "video_clip_indices"]

# Tried, in order, when an annotation names a video without extension (Kinetics lists ids only).
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")


def load_image(path: str, annotation: str | None = None, line: int | None = None) -> Image.Image:
    """Open an image as RGB; a missing or corrupt file raises `MediaError` naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise MediaError(f"image {path} not found{where(annotation, line)}", file=path,
                         annotation=annotation, line=line) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise MediaError(f"cannot read image {path}{where(annotation, line)}: {exc}", file=path,
                         annotation=annotation, line=line) from exc


def resolve_video_path(path: str, annotation: str | None = None, line: int | None = None) -> str:
    """`path` itself, or `path` + the first common video extension that exists."""
    if os.path.isfile(path):
        return path
    if not os.path.splitext(path)[1] or not os.path.exists(path):
        for ext in VIDEO_EXTENSIONS:
            if os.path.isfile(path + ext):
                return path + ext
    raise MediaError(
        f"video {path} not found (also tried extensions {', '.join(VIDEO_EXTENSIONS)}){where(annotation, line)}",
        file=path, annotation=annotation, line=line,
    )


def video_clip_indices(total: int, fps: float, frames: int, frame_stride: int, training: bool,
                       clips: int = 1) -> list[int]:
    """Frame indices of one clip of `frames * clips` frames (the release's `random_clip`).

    Frames are `frame_stride * fps / 30` apart (the stride is given at 30 fps); with `clips > 1`
    (evaluation views, the release's 'v2') `frames * clips` frames are taken at stride / clips,
    to be split into `clips` interleaved clips. Training starts at a random frame (numpy global
    generator: call inside `sample_rng`), evaluation at the centre. Indices past the end wrap.
    """
    if total < 1:
        raise ValueError("video has no frames")
    n = frames * clips
    # The release shortens the stride to int(stride / clips) for its multi-view evaluation.
    stride = (frame_stride if clips == 1 else max(1, int(frame_stride / clips))) * fps / 30.0
    span = int(stride * (n - 1) + 1)
    if training:
        highest = total - span
        start = int(np.random.randint(0, highest)) if highest > 0 else 0
    else:
        start = max(0, (total - int(stride * n)) // 2)
    return [int(start + int(i * stride)) % total for i in range(n)]


def read_video_frames(path: str, frames: int, frame_stride: int, training: bool, clips: int = 1,
                      annotation: str | None = None, line: int | None = None) -> Tensor:
    """Decode the frames of one clip with PyAV: uint8 [frames * clips, H, W, 3] (RGB)."""
    import av  # local import: only video tasks need PyAV

    path = resolve_video_path(path, annotation, line)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(f"video {path} has no video stream{where(annotation, line)}", file=path,
                                 annotation=annotation, line=line)
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else 30.0
            total = int(stream.frames or 0)
            if total <= 0:  # unknown in the header: count by decoding (a second pass reopens)
                total = sum(1 for _ in container.decode(stream))
            if total <= 0:
                raise MediaError(f"video {path} has no frames{where(annotation, line)}", file=path,
                                 annotation=annotation, line=line)
            indices = video_clip_indices(total, fps, frames, frame_stride, training, clips)
            wanted = set(indices)
            last_needed = max(indices)
            decoded: dict[int, np.ndarray] = {}
            for i, frame in enumerate(_decode_from_start(container, path)):
                if i in wanted:
                    decoded[i] = frame.to_ndarray(format="rgb24")
                if i >= last_needed:
                    break
    except MediaError:
        raise
    except Exception as exc:  # PyAV raises many error types (InvalidDataError, FFmpegError, ...)
        raise MediaError(f"cannot decode video {path}{where(annotation, line)}: {exc}", file=path,
                         annotation=annotation, line=line) from exc
    if not decoded:
        raise MediaError(f"video {path}: no frame could be decoded{where(annotation, line)}", file=path,
                         annotation=annotation, line=line)
    # Headers may over-count frames: indices past the last decoded frame repeat it (the release).
    latest = decoded[max(decoded)]
    out = [decoded.get(i, latest) for i in indices]
    return torch.from_numpy(np.stack(out))


def _decode_from_start(container, path: str):
    """Frames of the first video stream from the start (reopening if it was already read)."""
    import av

    stream = container.streams.video[0]
    if stream.frames:
        yield from container.decode(stream)
        return
    with av.open(path) as again:
        yield from again.decode(again.streams.video[0])
