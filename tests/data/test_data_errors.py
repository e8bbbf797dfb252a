"""Errors name the file (and annotation line); `on_error: skip` leaves bad samples out and counts them."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import task, write_image
from uniperceiver.config import DataSourceConfig, TargetSetConfig
from uniperceiver.data import DataError, build_dataset, build_target_set, make_collate


def _imagenet(root: Path, tok, on_error: str = "raise", which: str = "train"):
    t = task("image_classification")
    src = DataSourceConfig(format="imagenet", root=str(root), on_error=on_error, split="train")
    if which == "train":
        t.train_data = src
    else:
        t.eval_data = src
    return build_dataset(t, which, tok)


def _three_images(tmp_path: Path) -> Path:
    write_image(tmp_path / "train/ok0.png")
    (tmp_path / "train/corrupt.png").write_bytes(b"not an image at all")
    write_image(tmp_path / "train/ok2.png")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta/train.txt").write_text("ok0.png 0\ncorrupt.png 1\nmissing.png 1\nok2.png 2\n")
    return tmp_path


def test_corrupt_and_missing_images_name_file_and_line(tmp_path: Path, tok) -> None:
    ds = _imagenet(_three_images(tmp_path), tok)
    with pytest.raises(DataError) as err:
        ds[(1, 0)]
    msg = str(err.value)
    assert "corrupt.png" in msg and f"{tmp_path / 'meta/train.txt'}:2" in msg
    assert err.value.line == 2 and err.value.file.endswith("corrupt.png")
    with pytest.raises(DataError, match=r"missing\.png not found.*train\.txt:3"):
        ds[(2, 0)]
    assert isinstance(err.value, ValueError)


def test_skip_mode_replaces_unreadable_media_deterministically(tmp_path: Path, tok, caplog) -> None:
    ds = _imagenet(_three_images(tmp_path), tok, on_error="skip", which="eval")
    with caplog.at_level(logging.WARNING, logger="uniperceiver.data"):
        s = ds[1]  # corrupt -> missing -> ok2
    assert s["id"] == "ok2.png" and s["skipped"] == 2 and ds.skipped == 2
    assert "corrupt.png" in caplog.text and "missing.png" in caplog.text
    assert ds[0]["id"] == "ok0.png" and "skipped" not in ds[0]
    b = make_collate(task("image_classification"), tok, training=False)([ds[0], ds[2]])
    assert b.meta["skipped"] == 1 and ds.skipped == 3


def test_malformed_line(tmp_path: Path, tok) -> None:
    write_image(tmp_path / "train/a.png")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta/train.txt").write_text("a.png 0\na.png\na.png zero\na.png 1\n")
    with pytest.raises(DataError, match=r"train\.txt:2: expected 'relative/path\.JPEG class_id'") as err:
        _imagenet(tmp_path, tok)
    assert err.value.line == 2
    ds = _imagenet(tmp_path, tok, on_error="skip")
    assert len(ds) == 2 and ds.skipped_lines == 2


@pytest.mark.parametrize("fmt, content, line", [
    ("imagenet22k", "n01 1 0\nn01 2\n", 2),
    ("flickr30k", '{"img_path": "a.jpg", "sentences": ["x"]}\n{"img_path": "b.jpg"}\n', 2),
    ("glue", "good\t1\n\nmeh\tmaybe\n", 3),
    ("jsonl", '{"image": "a.png", "label": 0}\n{"image": "a.png", "label": 0\n', 2),
])
def test_malformed_lines_other_formats(tmp_path: Path, tok, fmt: str, content: str, line: int) -> None:
    ann = tmp_path / "ann.txt"
    ann.write_text(content)
    type_ = {"imagenet22k": "image_classification", "flickr30k": "image_retrieval",
             "glue": "text_classification", "jsonl": "image_classification"}[fmt]
    t = task(type_)
    t.train_data = DataSourceConfig(format=fmt, root=str(tmp_path), annotations=str(ann))
    with pytest.raises(DataError, match=rf"ann\.txt:{line}: "):
        build_dataset(t, "train", tok)


def test_kinetics_bad_label_and_missing_video(kinetics_tree: Path, tmp_path: Path, tok) -> None:
    ann = json.loads((kinetics_tree / "annotation.json").read_text())
    ann["database"]["vid_x"] = {"subset": "training", "annotations": {"label": "juggling"}}
    ann["database"]["vid_y"] = {"subset": "training", "annotations": {"label": "abseiling"}}
    (tmp_path / "annotation.json").write_text(json.dumps(ann, indent=1))
    (tmp_path / "category_mapping.txt").write_text((kinetics_tree / "category_mapping.txt").read_text())
    t = task("video_classification", frames=2)
    t.train_data = DataSourceConfig(format="kinetics", root=str(kinetics_tree), annotations=str(tmp_path))
    with pytest.raises(DataError, match=r"annotation\.json:\d+: entry 'vid_x': label 'juggling' is not in"):
        build_dataset(t, "train", tok)
    t.train_data.on_error = "skip"
    ds = build_dataset(t, "train", tok)
    assert ds.skipped_lines == 1 and len(ds) == 3
    t.train_data.on_error = "raise"
    del ann["database"]["vid_x"]
    (tmp_path / "annotation.json").write_text(json.dumps(ann))
    ds = build_dataset(t, "train", tok)
    with pytest.raises(DataError, match=r"abseiling/vid_y not found.*annotation\.json entry 'vid_y'"):
        ds[(2, 0)]


def test_class_name_file_length_mismatch(imagenet_tree: Path, tmp_path: Path, tok) -> None:
    names = tmp_path / "names.txt"
    names.write_text("tench\n")  # the annotations use labels 0 and 1
    src = build_target_set("set", TargetSetConfig(kind="class_names", file=str(names)), tok)
    t = task("image_classification")
    t.train_data = DataSourceConfig(format="imagenet", root=str(imagenet_tree))
    with pytest.raises(DataError, match=r"label 1 at .*train\.txt:2 does not index target set 'set', which has 1 "):
        build_dataset(t, "train", tok, num_classes=len(src))
    build_dataset(t, "train", tok, num_classes=2)


def test_kinetics_category_count_mismatch(kinetics_tree: Path, tok) -> None:
    t = task("video_classification")
    t.train_data = DataSourceConfig(format="kinetics", root=str(kinetics_tree), annotations=str(kinetics_tree))
    with pytest.raises(DataError, match=r"category_mapping\.txt lists 2 classes but target set 'set' has 400"):
        build_dataset(t, "train", tok, num_classes=400)


def test_missing_annotation_file(tmp_path: Path, tok) -> None:
    t = task("image_caption")
    t.train_data = DataSourceConfig(format="coco_karpathy", root=str(tmp_path), annotations=str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="nope.json"):
        build_dataset(t, "train", tok)
