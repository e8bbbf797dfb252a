"""Collate: the exact TaskBatch layout every task formulation consumes."""
from __future__ import annotations

import pytest
import torch

from conftest import task
from uniperceiver.data import make_collate
from uniperceiver.modeling.attributes import task_attributes

SPE, EOT = 49410, 49407


def _img(v: float = 0.0) -> torch.Tensor:
    return torch.full((3, 32, 32), v)


def test_image_classification(tok) -> None:
    t = task("image_classification", loss_weight=0.5, label_smoothing=0.1)
    b = make_collate(t, tok, training=True, task_id=3)([
        {"image": _img(1), "label": 4, "id": "a"}, {"image": _img(2), "label": 7, "id": "b"}])
    assert b.kind == "classification" and b.task == t.name and b.temperature == "img_cls"
    seg = b.inputs.segments[0]
    assert seg.modality == "image" and seg.data.shape == (2, 1, 3, 32, 32) and seg.data[1].max() == 2
    assert b.labels.tolist() == [4, 7] and b.labels.dtype == torch.long
    assert b.target_set == "set" and b.loss_weight == 0.5 and b.label_smoothing == 0.1
    assert torch.equal(b.inputs.attributes_SA, torch.tensor([[1., 0, 0, 1, 1, 0, 0, 0]]))
    assert b.inputs.task_id == 3 and b.meta["ids"] == ["a", "b"] and b.meta["skipped"] == 0


def test_video_classification_multiview(tok) -> None:
    t = task("video_classification")
    views = torch.arange(6.0).view(6, 1, 1, 1, 1).expand(6, 2, 3, 32, 32)  # [V=6, T=2, 3, S, S]
    b = make_collate(t, tok, training=False)([
        {"video": views, "label": 1, "id": 0}, {"video": views + 10, "label": 2, "id": 1, "skipped": 2}])
    seg = b.inputs.segments[0]
    assert seg.modality == "video" and seg.data.shape == (12, 2, 3, 32, 32)
    # sample-major rows: b * V + v
    assert seg.data[:, 0, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15]
    assert b.labels.tolist() == [1] * 6 + [2] * 6 and b.meta["views"] == 6
    assert b.meta["sample_labels"].tolist() == [1, 2] and b.meta["skipped"] == 2
    assert b.temperature == "video_cls"


def test_caption_training_layout(tok) -> None:
    t = task("image_caption", max_text_len=50)
    caps = ["a dog", "A black cat sits on the mat"]
    b = make_collate(t, tok, training=True)([{"image": _img(), "caption": c, "id": i} for i, c in enumerate(caps)])
    ids0, ids1 = (tok.encode(c + " <|endoftext|>") for c in caps)
    assert ids0 == [320, 1929, EOT]
    n0, n1 = len(ids0), len(ids1)
    t_len = max(n0, n1)
    assert b.kind == "caption" and b.inputs.caption_queries
    vis, text = b.inputs.segments
    assert vis.modality == "image" and text.modality == "text"
    assert text.data.shape == (2, 2 * t_len) and text.padding_mask.shape == (2, 2 * t_len)
    for row, ids in ((0, ids0), (1, ids1)):
        n = len(ids)
        words, queries = text.data[row, :t_len].tolist(), text.data[row, t_len:].tolist()
        assert words == ids + [0] * (t_len - n)
        assert queries == [SPE] * n + [0] * (t_len - n)
        mask = text.padding_mask[row].tolist()
        assert mask[:t_len] == [False] * n + [True] * (t_len - n)
        assert mask[t_len:] == [False] * n + [True] * (t_len - n)
        assert b.labels[row].tolist() == ids + [-1] * (t_len - n)
    assert text.positions.tolist() == list(range(t_len)) * 2
    assert b.labels.shape == (2, t_len) and b.target_set == "set" and b.temperature == "caption"
    assert torch.equal(b.inputs.attributes_SA, task_attributes("image_caption"))
    assert b.inputs.attributes_SA[1].tolist() == [1, 1, 0, 1, 0, 1, 0, 1]


def test_caption_truncation_keeps_eot(tok) -> None:
    t = task("image_caption", max_text_len=5)
    b = make_collate(t, tok, training=True)([{"image": _img(), "caption": "one two three four five six seven"}])
    words = b.inputs.segments[1].data[0, :5].tolist()
    assert words == tok.encode("one two three four") + [EOT]
    assert b.labels[0].tolist() == words


def test_caption_eval(tok) -> None:
    t = task("video_caption")
    b = make_collate(t, tok, training=False)([
        {"video": torch.zeros(4, 3, 32, 32), "captions": ["x", "y"], "id": 11}])
    assert len(b.inputs.segments) == 1 and b.inputs.segments[0].data.shape == (1, 4, 3, 32, 32)
    assert not b.inputs.caption_queries and b.labels is None
    assert b.inputs.attributes_SA.tolist() == [[1, 1, 0, 1, 1, 0, 0, 0]]
    assert b.decode_attributes_SA.tolist() == [[1, 1, 0, 1, 0, 1, 0, 1]]
    assert b.meta["captions"] == [["x", "y"]] and b.meta["ids"] == [11] and b.target_set == "set"


def test_retrieval_training_and_eval(tok) -> None:
    t = task("image_retrieval", max_text_len=50)
    b = make_collate(t, tok, training=True, task_id=1)([
        {"image": _img(), "caption": "a dog"}, {"image": _img(), "caption": "two big red cars"}])
    assert b.kind == "retrieval" and b.target_owner is None and b.temperature == "retrieve"
    tgt = b.targets.segments[0]
    assert tgt.data.tolist() == [[320, 1929, EOT, 0, 0], tok.encode("two big red cars <|endoftext|>")]
    assert tgt.padding_mask.tolist() == [[False] * 3 + [True] * 2, [False] * 5]
    assert b.targets.attributes_SA.tolist() == [[1, 0, 0, 1, 0, 1, 1, 0]] and b.targets.task_id == 1
    assert b.inputs.attributes_SA.tolist() == [[1, 0, 0, 1, 1, 0, 0, 0]]

    ev = make_collate(t, tok, training=False)([
        {"image": _img(), "captions": ["a", "b", "c"], "id": 5}, {"image": _img(), "captions": ["d"], "id": 6}])
    assert ev.target_owner.tolist() == [0, 0, 0, 1]
    assert ev.targets.segments[0].data.shape == (4, 2)
    assert ev.meta["captions"] == [["a", "b", "c"], ["d"]] and ev.meta["ids"] == [5, 6]


def test_mlm_layout(tok) -> None:
    t = task("text_mlm")
    b = make_collate(t, tok, training=True)([
        {"ids": [5, SPE, 7, EOT], "mlm_labels": [-1, 6, -1, -1], "id": 0},
        {"ids": [8, EOT], "mlm_labels": [9, -1], "id": 1}])
    seg = b.inputs.segments[0]
    assert seg.data.tolist() == [[5, SPE, 7, EOT], [8, EOT, 0, 0]]
    assert seg.padding_mask.tolist() == [[False] * 4, [False, False, True, True]]
    assert b.labels.tolist() == [[-1, 6, -1, -1], [9, -1, -1, -1]]
    assert b.kind == "mlm" and b.temperature == "text_mlm" and b.target_set == "set"
    assert b.inputs.attributes_SA.tolist() == [[0, 1, 0, 1, 0, 1, 0, 0]]


def test_text_classification_layout(tok) -> None:
    t = task("text_classification")
    b = make_collate(t, tok, training=False)([
        {"ids": [1, 2, SPE, 3], "spe_index": 2, "label": 1}, {"ids": [SPE, 3], "spe_index": 0, "label": 0}])
    assert b.kind == "text_classification" and b.temperature == "downstream"
    assert b.spe_index.tolist() == [2, 0] and b.labels.tolist() == [1, 0]
    assert b.inputs.segments[0].data.tolist() == [[1, 2, SPE, 3], [SPE, 3, 0, 0]]


def test_missing_key_and_empty_batch(tok) -> None:
    collate = make_collate(task("image_caption"), tok, training=True)
    with pytest.raises(KeyError, match="'caption'"):
        collate([{"image": _img(), "captions": ["x"]}])
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_batches_run_through_the_tasks(tok) -> None:
    """Collated batches are accepted by the task formulations of a tiny model."""
    from uniperceiver.config import ModelConfig
    from uniperceiver.modeling.model import UniPerceiver
    from uniperceiver.tasks import run_task

    torch.manual_seed(0)
    model = UniPerceiver(ModelConfig(d_model=32, num_layers=1, num_heads=2, d_ffn=64, image_size=32)).eval()
    feats = {"set": torch.randn(49411, 32)}
    cases = [
        ("image_classification", [{"image": _img(), "label": 3}, {"image": _img(), "label": 1}]),
        ("image_caption", [{"image": _img(), "caption": "a dog"}, {"image": _img(), "caption": "the cat"}]),
        ("image_retrieval", [{"image": _img(), "caption": "a dog"}, {"image": _img(), "caption": "a cat"}]),
        ("text_mlm", [{"ids": [5, SPE, EOT], "mlm_labels": [-1, 6, -1]}]),
        ("text_classification", [{"ids": [5, SPE, EOT], "spe_index": 1, "label": 1}]),
    ]
    with torch.no_grad():
        for type_, samples in cases:
            out = run_task(model, make_collate(task(type_), tok, training=True)(samples), feats)
            assert torch.isfinite(out.loss), type_
