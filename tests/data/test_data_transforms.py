"""Transforms by task type, video views, Mixup/CutMix and the soft-target loss."""
from __future__ import annotations

import torch
from PIL import Image

from conftest import task
from uniperceiver.data import build_image_transform, build_mixup, build_video_transform, make_collate, sample_rng
from uniperceiver.tasks.losses import accuracy, cross_entropy


def _image(w: int = 60, h: int = 40) -> Image.Image:
    return Image.frombytes("RGB", (w, h), bytes(range(256)) * (w * h * 3 // 256) + bytes(w * h * 3 % 256))


def test_image_transforms_by_task_type() -> None:
    img = _image()
    cls_train = build_image_transform(task("image_classification"), None, training=True)
    assert "RandAugment" in repr(cls_train) and "RandomErasing" in repr(cls_train)
    cap_train = build_image_transform(task("image_caption"), None, training=True)
    assert "RandomCrop" in repr(cap_train) and "RandAugment" not in repr(cap_train)
    ev = build_image_transform(task("image_classification"), None, training=False)
    assert "Resize(size=36" in repr(ev)  # int(256/224 * 32)
    none = build_image_transform(task("image_caption", augment="none"), None, training=True)
    assert "CenterCrop" in repr(none)
    for tf in (cls_train, cap_train, ev, none):
        with sample_rng(1):
            out = tf(img)
        assert out.shape == (3, 32, 32)


def test_video_transform_train_and_views() -> None:
    frames = torch.randint(0, 256, (3, 40, 60, 3), dtype=torch.uint8)
    train = build_video_transform(task("video_classification"), None, training=True)
    with sample_rng(3):
        a = train(frames)
    with sample_rng(3):
        b = train(frames)
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b)
    ev = build_video_transform(task("video_classification", eval_crops=3), None, training=False)
    views = ev(frames)
    assert views.shape == (3, 3, 3, 32, 32)
    # short side 40 -> 32, long side 60 -> 48: crops start at x = 0, 8, 16
    full = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2).float() / 255, size=(32, 48),
                                           mode="bilinear", align_corners=False)
    for v, x0 in enumerate((0, 8, 16)):
        assert torch.allclose(views[v], (full[..., x0:x0 + 32] - 0.5) / 0.5, atol=1e-6)


def test_mixup_soft_targets_and_loss(tok) -> None:
    t = task("image_classification", mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    batch = make_collate(t, tok, training=True)([{"image": torch.full((3, 32, 32), float(i)), "label": i}
                                                 for i in range(4)])
    mix = build_mixup(t, num_classes=5)
    out = mix(batch, seed=7)
    again = mix(batch, seed=7)
    assert torch.equal(out.labels, again.labels) and torch.equal(out.inputs.segments[0].data,
                                                                 again.inputs.segments[0].data)
    assert out.labels.shape == (4, 5) and out.labels.dtype == torch.float32
    assert torch.allclose(out.labels.sum(-1), torch.ones(4))
    assert out.label_smoothing == 0.0 and batch.labels.dtype == torch.long  # the input batch is untouched
    logits = torch.randn(4, 5)
    expected = -(out.labels * logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(cross_entropy(logits, out.labels), expected)
    assert 0.0 <= accuracy(logits, out.labels).item() <= 1.0
    assert build_mixup(task("image_classification"), 5) is None
