"""Each reader's samples: keys, shapes, normalisation, labels, ids."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import task, write_image, write_video
from uniperceiver.config import DataSourceConfig
from uniperceiver.data import build_dataset
from uniperceiver.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def _with(t, which="train", **src):
    src.setdefault("split", "train" if which == "train" else "val")
    cfg = DataSourceConfig(**src)
    if which == "train":
        t.train_data = cfg
    else:
        t.eval_data = cfg
    return t


def _pixel(color: tuple[int, int, int]) -> torch.Tensor:
    return (torch.tensor(color) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def test_imagenet_train_and_eval(imagenet_tree: Path, tok) -> None:
    t = _with(task("image_classification"), "train", format="imagenet", root=str(imagenet_tree))
    ds = build_dataset(t, "train", tok)
    assert len(ds) == 2
    s = ds[(0, 123)]
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert s["label"] == 0 and s["id"] == "n01/a.JPEG"
    assert ds[(1, 5)]["label"] == 1

    t = _with(task("image_classification"), "eval", format="imagenet", root=str(imagenet_tree),
              annotations=str(imagenet_tree / "meta"))
    ev = build_dataset(t, "eval", tok)
    s = ev[0]
    assert s["label"] == 1 and s["image"].shape == (3, 32, 32)
    # Eval = resize + centre crop, no randomness: the red channel is the constant 200.
    assert torch.allclose(s["image"][0], _pixel((200, 0, 0))[0].expand(32, 32), atol=1e-2)
    assert torch.equal(ev[0]["image"], ev[0]["image"])


def test_imagenet22k(tmp_path: Path, tok) -> None:
    write_image(tmp_path / "n0001/n0001_7.JPEG")
    write_image(tmp_path / "n0002/n0002_3.JPEG")
    (tmp_path / "list.txt").write_text("n0001 7 5\nn0002 3 21000\n")
    t = _with(task("image_classification"), "train", format="imagenet22k", root=str(tmp_path),
              annotations=str(tmp_path / "list.txt"))
    ds = build_dataset(t, "train", tok)
    assert [ds[(i, 0)]["label"] for i in range(2)] == [5, 21000]
    assert ds[(1, 0)]["id"] == "n0002/n0002_3.JPEG"


def test_kinetics_train_clip(kinetics_tree: Path, tok) -> None:
    t = _with(task("video_classification", frames=4, frame_stride=8), "train", format="kinetics",
              root=str(kinetics_tree), annotations=str(kinetics_tree / "annotation.json"))
    ds = build_dataset(t, "train", tok)
    assert len(ds) == 2
    s = ds[(0, 11)]
    assert s["video"].shape == (4, 3, 32, 32) and s["label"] == 1 and s["id"] == "vid_a"
    # mean = std = 0.5: pixel values land in [-1, 1]
    assert s["video"].min() >= -1.0 - 1e-5 and s["video"].max() <= 1.0 + 1e-5
    # frame brightness grows with the frame index and the stride is 8 frames (30 fps)
    means = s["video"].mean(dim=(1, 2, 3))
    assert torch.all(means[1:] > means[:-1])
    steps = (means[1:] - means[:-1]) * 0.5 * 255 / 6
    assert torch.allclose(steps, torch.full_like(steps, 8.0), atol=1.5)
    assert torch.equal(ds[(0, 11)]["video"], s["video"])  # start frame, jitter, flip and crop follow the seed
    # a portrait video (32 x 48) works too
    assert ds[(1, 3)]["video"].shape == (4, 3, 32, 32)


def test_kinetics_eval_multiview(kinetics_tree: Path, tok) -> None:
    t = _with(task("video_classification", frames=4, frame_stride=8, eval_clips=2, eval_crops=3), "eval",
              format="kinetics", root=str(kinetics_tree), annotations=str(kinetics_tree))
    ds = build_dataset(t, "eval", tok)
    assert len(ds) == 1
    v = ds[0]["video"]
    assert v.shape == (6, 4, 3, 32, 32)  # 3 crops x 2 clips, crop-major
    # clips interleave: clip 0 takes frames 0, 2, 4, 6 and clip 1 frames 1, 3, 5, 7 of the 8
    # frames sampled at stride 8 / 2 = 4 -> clip 1 is 4 frames (one sub-stride) later
    b0, b1 = v[0].mean(dim=(1, 2, 3)), v[1].mean(dim=(1, 2, 3))
    diff = (b1 - b0) * 0.5 * 255 / 6
    assert torch.allclose(diff, torch.full_like(diff, 4.0), atol=1.5)
    # the video is uniform in space, so the three crops agree
    assert torch.allclose(v[0], v[2], atol=1e-5) and torch.allclose(v[0], v[4], atol=1e-5)
    assert torch.equal(ds[0]["video"], v)  # deterministic


def test_coco_karpathy(coco_tree: Path, tok) -> None:
    t = _with(task("image_caption"), "train", format="coco_karpathy", root=str(coco_tree),
              annotations=str(coco_tree / "dataset_coco.json"))
    ds = build_dataset(t, "train", tok)
    assert len(ds) == 3  # train + restval
    s = ds[(1, 7)]
    assert s["image"].shape == (3, 32, 32) and s["id"] == 101
    assert s["caption"] in ("A picture number 1.", "Image 1 shows a thing")

    t = _with(task("image_retrieval"), "eval", format="coco_karpathy", root=str(coco_tree),
              annotations=str(coco_tree), split="test")
    ev = build_dataset(t, "eval", tok)
    assert len(ev) == 1 and ev[0]["captions"] == ["A picture number 2.", "Image 2 shows a thing"]
    assert ev[0]["id"] == 102 and "caption" not in ev[0]


def test_coco_release_caption_files(tmp_path: Path, tok) -> None:
    write_image(tmp_path / "val2014/x.jpg")
    write_image(tmp_path / "val2014/y.jpg")
    data = {"images": [{"id": 7, "file_path": "val2014", "file_name": "x.jpg"},
                       {"id": 9, "file_path": "val2014", "file_name": "y.jpg"}],
            "annotations": [{"image_id": 7, "id": 5, "caption": "second"}, {"image_id": 7, "id": 2, "caption": "first"},
                            {"image_id": 9, "id": 1, "caption": "only"}]}
    (tmp_path / "captions_test5k.json").write_text(json.dumps(data))
    t = _with(task("image_caption"), "eval", format="coco_karpathy", root=str(tmp_path),
              annotations=str(tmp_path), split="test")
    ds = build_dataset(t, "eval", tok)
    assert [ds[i]["captions"] for i in range(2)] == [["first", "second"], ["only"]]
    assert [ds[i]["id"] for i in range(2)] == [7, 9]


def test_flickr30k(tmp_path: Path, tok) -> None:
    write_image(tmp_path / "imgs/1.jpg")
    write_image(tmp_path / "imgs/2.jpg")
    lines = [{"id": 1, "img_path": "imgs/1.jpg", "sentences": ["a dog", "the dog"]},
             {"id": 2, "img_path": "imgs/2.jpg", "sentences": ["a cat"]}]
    (tmp_path / "all_data_final_test_set0_2014.jsonline").write_text("\n".join(json.dumps(x) for x in lines))
    t = _with(task("image_retrieval"), "eval", format="flickr30k", root=str(tmp_path),
              annotations=str(tmp_path), split="test")
    ds = build_dataset(t, "eval", tok)
    assert ds[0]["captions"] == ["a dog", "the dog"] and ds[1]["id"] == 2


def test_jsonl_manifest(tmp_path: Path, tok) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    (tmp_path / "classes.txt").write_text("tench|tinca tinca\ngoldfish\n")
    (tmp_path / "train.jsonl").write_text(
        '{"image": "a.png", "label": "tinca tinca"}\n{"image": "b.png", "label": 1, "id": "bee"}\n')
    t = _with(task("image_classification"), "train", format="jsonl", root=str(tmp_path),
              annotations=str(tmp_path / "train.jsonl"), options={"class_names": str(tmp_path / "classes.txt")})
    ds = build_dataset(t, "train", tok)
    assert [ds[(i, 0)]["label"] for i in range(2)] == [0, 1]
    assert ds[(0, 0)]["id"] == 1 and ds[(1, 0)]["id"] == "bee"

    (tmp_path / "cap.jsonl").write_text('{"image": "a.png", "captions": ["x y", "z"]}\n{"image": "b.png", "caption": "w"}\n')
    t = _with(task("image_caption"), "eval", format="jsonl", annotations=str(tmp_path / "cap.jsonl"))
    ev = build_dataset(t, "eval", tok)  # no root: paths relative to the manifest
    assert ev[0]["captions"] == ["x y", "z"] and ev[1]["captions"] == ["w"]

    (tmp_path / "txt.jsonl").write_text('{"text": "a fine film", "label": 1}\n')
    t = _with(task("text_classification"), "eval", format="jsonl", annotations=str(tmp_path / "txt.jsonl"))
    s = build_dataset(t, "eval", tok)[0]
    assert s["ids"][s["spe_index"]] == tok.SPE and s["label"] == 1


def test_jsonl_video(tmp_path: Path, tok) -> None:
    write_video(tmp_path / "clip.mp4", frames=20)
    (tmp_path / "v.jsonl").write_text('{"video": "clip.mp4", "caption": "a clip"}\n')
    t = _with(task("video_caption", frames=2, frame_stride=16), "eval", format="jsonl",
              annotations=str(tmp_path / "v.jsonl"))
    s = build_dataset(t, "eval", tok)[0]
    assert s["video"].shape == (2, 3, 32, 32) and s["captions"] == ["a clip"]


def test_glue_sst2(tmp_path: Path, tok) -> None:
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na gripping , funny film\t1\nbad\t0\n")
    t = _with(task("text_classification", max_text_len=16), "train", format="glue", root=str(tmp_path),
              options={"task": "SST-2", "skip_header": True})
    ds = build_dataset(t, "train", tok)
    s = ds[(0, 0)]
    expected = tok.encode("a gripping , funny film <|endoftext|> It is <|spe|>. <|endoftext|>")
    assert s["ids"] == expected and s["label"] == 1 and s["id"] == 2
    assert s["spe_index"] == len(expected) - 3 and s["ids"][s["spe_index"]] == tok.SPE
    # truncation keeps the prompt: a long sentence loses its end
    (tmp_path / "val.tsv").write_text(" ".join(["word"] * 40) + "\t0\n")
    t = _with(task("text_classification", max_text_len=16), "eval", format="glue", annotations=str(tmp_path),
              options={"task": "SST-2"})
    s = build_dataset(t, "eval", tok)[0]
    assert len(s["ids"]) == 16 and s["ids"][-6:] == expected[-6:] and s["ids"][s["spe_index"]] == tok.SPE


def test_glue_pair_with_label_names(tmp_path: Path, tok) -> None:
    (tmp_path / "dev.tsv").write_text("The cat sat.\tA cat is sitting\tentailment\nNo.\tYes\tnot_entailment\n")
    t = _with(task("text_classification"), "eval", format="glue", annotations=str(tmp_path / "dev.tsv"),
              options={"task": "RTE"})
    ds = build_dataset(t, "eval", tok)
    s = ds[0]
    # RTE: the final period of sentence 1 is dropped, then " ? <|endoftext|> it is <|spe|> , s2 <|endoftext|>"
    assert s["ids"] == tok.encode("the cat sat ? <|endoftext|> it is <|spe|> , a cat is sitting <|endoftext|>")
    assert [s["label"], ds[1]["label"]] == [1, 0]


def test_mlm_corpus_sample(tmp_path: Path, tok) -> None:
    (tmp_path / "corpus.txt").write_text("the quick brown fox\n\njumps over the lazy dog\nend\n")
    t = _with(task("text_mlm", max_text_len=12), "train", format="mlm_corpus",
              annotations=str(tmp_path / "corpus.txt"), options={"min_words": 8})
    ds = build_dataset(t, "train", tok)
    assert len(ds) == 3  # non-empty lines
    s = ds[(0, 4)]
    assert len(s["ids"]) == len(s["mlm_labels"]) == 11  # 4 + EOT + 5 + EOT words, one id each
    original = tok.encode("the quick brown fox <|endoftext|> jumps over the lazy dog <|endoftext|>")
    for i, (tid, lab) in enumerate(zip(s["ids"], s["mlm_labels"])):
        assert lab in (-1, original[i])
        if lab == -1:
            assert tid == original[i]
    # sample 2 ('end') wraps around to the start until 8 words, then truncates keeping the last id
    s = ds[(2, 4)]
    assert len(s["ids"]) == 12
    unmasked = [lab if lab != -1 else tid for tid, lab in zip(s["ids"], s["mlm_labels"])]
    full = tok.encode("end <|endoftext|> the quick brown fox <|endoftext|> jumps over the lazy dog <|endoftext|>")
    assert unmasked == full[:11] + [full[-1]]


def test_limit_and_missing_eval_data(imagenet_tree: Path, tok) -> None:
    t = _with(task("image_classification"), "train", format="imagenet", root=str(imagenet_tree), limit=1)
    assert len(build_dataset(t, "train", tok)) == 1
    with pytest.raises(ValueError, match="no eval_data"):
        build_dataset(t, "eval", tok)
