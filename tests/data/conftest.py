"""Tiny on-the-fly fixtures for the data-layer tests: images, list files, videos, captions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uniperceiver.config import TaskConfig
from uniperceiver.tokenization import ClipTokenizer


@pytest.fixture(scope="session")
def tok() -> ClipTokenizer:
    return ClipTokenizer()


def write_image(path: Path, size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (200, 30, 90),
                fmt: str | None = None) -> Path:
    """A small solid-colour image with a gradient (so crops and flips differ)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:] = color
    arr[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    Image.fromarray(arr).save(path, format=fmt)
    return path


def write_video(path: Path, frames: int = 40, size: tuple[int, int] = (48, 32), fps: int = 30) -> Path:
    """A short mpeg4 clip whose frame i has brightness ~ 6 * i (frame order is visible)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = np.full((h, w, 3), min(255, 6 * i), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def task(type_: str, **kw) -> TaskConfig:
    """A TaskConfig with a target set where the type needs one and 32-px images."""
    needs_set = not type_.endswith("retrieval")
    kw.setdefault("image_size", 32)
    return TaskConfig(name=kw.pop("name", type_), type=type_, target_set="set" if needs_set else None, **kw)


@pytest.fixture
def imagenet_tree(tmp_path: Path) -> Path:
    """root/{train,val}/..., root/meta/{train,val}.txt with 2 lines each."""
    write_image(tmp_path / "train/n01/a.JPEG", color=(255, 0, 0))
    write_image(tmp_path / "train/n02/b.JPEG", color=(0, 0, 255))
    write_image(tmp_path / "val/v1.JPEG", (64, 48), fmt="PNG")  # lossless: exact pixel checks
    write_image(tmp_path / "val/v2.JPEG", (48, 64))
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta/train.txt").write_text("n01/a.JPEG 0\nn02/b.JPEG 1\n")
    (tmp_path / "meta/val.txt").write_text("v1.JPEG 1\nv2.JPEG 0\n")
    return tmp_path


@pytest.fixture(scope="session")
def kinetics_tree(tmp_path_factory) -> Path:
    """annotation.json + category_mapping.txt + 2 training videos and 1 validation video."""
    root = tmp_path_factory.mktemp("kinetics")
    write_video(root / "training/air drumming/vid_a.mp4", frames=40)
    write_video(root / "training/abseiling/vid_b.mp4", frames=70, size=(32, 48))
    write_video(root / "validation/abseiling/vid_c.mp4", frames=60)
    db = {
        "vid_a": {"subset": "training", "annotations": {"label": "air drumming"}},
        "vid_b": {"subset": "training", "annotations": {"label": "abseiling"}},
        "vid_c": {"subset": "validation", "annotations": {"label": "abseiling"}},
    }
    (root / "annotation.json").write_text(json.dumps({"database": db}, indent=1))
    (root / "category_mapping.txt").write_text("abseiling\t0\nair_drumming\t1\n")
    return root


@pytest.fixture
def coco_tree(tmp_path: Path) -> Path:
    """A Karpathy dataset_coco.json with 2 train images, 1 restval, 1 test; images under root."""
    images = []
    for i, (split, folder) in enumerate([("train", "train2014"), ("restval", "val2014"), ("test", "val2014"),
                                         ("train", "train2014")]):
        name = f"COCO_{i}.jpg"
        write_image(tmp_path / folder / name, (50, 40), fmt="JPEG")
        sents = [{"raw": f"A picture number {i}."}, {"raw": f"Image {i} shows a thing"}]
        images.append({"filepath": folder, "filename": name, "sentences": sents, "split": split, "cocoid": 100 + i})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    return tmp_path
