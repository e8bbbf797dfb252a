"""Image and video transforms of the release (OFFICIAL.md 4.2), and batch-level Mixup/CutMix.

Every random transform draws from the global python / numpy / torch CPU generators, which the
datasets seed per sample (`uniperceiver.data.rng.sample_rng`).

- ImageNet-style classification: training = timm `create_transform` (RandomResizedCrop, hflip,
  RandAugment `rand-m9-mstd0.5-inc1`, color jitter 0.4, bicubic, RandomErasing 0.25 'pixel');
  evaluation = Resize(int(256/224 * S), bicubic) + CenterCrop(S). ImageNet mean/std.
- Captions / retrieval (the release's `clip_transforms`): training = Resize(S, bicubic) +
  RandomCrop(S) + hflip 0.5; evaluation = Resize(S, bicubic) + CenterCrop(S). ImageNet mean/std.
- Video: training = short side jittered in [int(256/224 S), int(320/224 S)] (bilinear), hflip 0.5,
  RandomCrop(S); evaluation = short side S and `crops` crops along the long side (1 = centre,
  3 = start/centre/end). Mean = std = 0.5.
- `augment: none` uses the evaluation transform in training too (a single centre crop for video).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ..config.model import ModelConfig
from ..config.schema import TaskConfig
from ..utils.task_registry import kind_spec, task_spec

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VIDEO_MEAN",
    "VIDEO_STD",
    "BatchMixup",
    "VideoTransform",
    "build_image_transform",
    "build_mixup",
    "build_video_transform",
    "clip_transform",
    "imagenet_transform",
    "input_size",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIDEO_MEAN = (0.5, 0.5, 0.5)
VIDEO_STD = (0.5, 0.5, 0.5)

ImageTransform = Callable[[Image.Image], Tensor]


def input_size(task: TaskConfig, model_cfg: ModelConfig | None) -> int:
    """The task's visual input size: `task.image_size`, else the model's."""
    if task.image_size is not None:
        return task.image_size
    return model_cfg.image_size if model_cfg is not None else 224


def imagenet_transform(size: int, training: bool) -> ImageTransform:
    """The release's ImageNet transforms (`task_dataset/imagenet.build_transform`)."""
    if training:
        from timm.data import create_transform

        return create_transform(
            input_size=size,
            is_training=True,
            color_jitter=0.4,
            auto_augment="rand-m9-mstd0.5-inc1",
            interpolation="bicubic",
            re_prob=0.25,
            re_mode="pixel",
            re_count=1,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
    return T.Compose([
        T.Resize(int((256 / 224) * size), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def clip_transform(size: int, training: bool, flip_prob: float = 0.5) -> ImageTransform:
    """The release's `clip_transforms` for captioning and retrieval images."""
    head: list = [T.Resize(size, interpolation=InterpolationMode.BICUBIC)]
    if training:
        head += [T.RandomCrop(size), T.RandomHorizontalFlip(flip_prob)]
    else:
        head += [T.CenterCrop(size)]
    return T.Compose(head + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def build_image_transform(task: TaskConfig, model_cfg: ModelConfig | None, training: bool) -> ImageTransform:
    """The image transform a task type uses (classification: ImageNet; captions/retrieval: CLIP)."""
    size = input_size(task, model_cfg)
    augment = training and task.augment != "none"
    if task_spec(task.type).image_pipeline == "imagenet":
        return imagenet_transform(size, augment)
    return clip_transform(size, augment)


def _resize_short_side(frames_TCHW: Tensor, size: int) -> Tensor:
    """Bilinear resize so the short side is `size` (the release's `random_short_side_scale_jitter`)."""
    h, w = frames_TCHW.shape[-2:]
    if (w <= h and w == size) or (h <= w and h == size):
        return frames_TCHW
    if w < h:
        new_h, new_w = int(math.floor(h / w * size)), size
    else:
        new_h, new_w = size, int(math.floor(w / h * size))
    return F.interpolate(frames_TCHW, size=(new_h, new_w), mode="bilinear", align_corners=False)


def _crop_offsets(length: int, size: int, crops: int) -> list[int]:
    """Offsets of `crops` evenly spaced crops along one axis; the centre one is ceil((L - S) / 2)."""
    if crops == 1:
        return [int(math.ceil((length - size) / 2))]
    return [int(math.ceil(i * (length - size) / (crops - 1))) for i in range(crops)]


class VideoTransform:
    """uint8 frames [T, H, W, 3] -> normalised float [T, 3, S, S] (or [crops, T, 3, S, S])."""

    def __init__(self, size: int, training: bool, crops: int = 1) -> None:
        if crops < 1:
            raise ValueError(f"crops must be >= 1, got {crops}")
        self.size = size
        self.training = training
        self.crops = crops

    def __call__(self, frames_THWC: Tensor) -> Tensor:
        x = frames_THWC.permute(0, 3, 1, 2).float().div_(255.0)
        s = self.size
        if self.training:
            lo, hi = int((256 / 224) * s), int((320 / 224) * s)
            x = _resize_short_side(x, int(round(np.random.uniform(lo, hi))))
            if np.random.uniform() < 0.5:
                x = x.flip(-1)
            h, w = x.shape[-2:]
            y0 = int(np.random.randint(0, h - s)) if h > s else 0
            x0 = int(np.random.randint(0, w - s)) if w > s else 0
            out = x[..., y0 : y0 + s, x0 : x0 + s]
        else:
            x = _resize_short_side(x, s)
            h, w = x.shape[-2:]
            views = []
            if w >= h:  # crops along the long side
                y0 = int(math.ceil((h - s) / 2))
                for x0 in _crop_offsets(w, s, self.crops):
                    views.append(x[..., y0 : y0 + s, x0 : x0 + s])
            else:
                x0 = int(math.ceil((w - s) / 2))
                for y0 in _crop_offsets(h, s, self.crops):
                    views.append(x[..., y0 : y0 + s, x0 : x0 + s])
            out = views[0] if self.crops == 1 else torch.stack(views)
        mean = torch.tensor(VIDEO_MEAN).view(3, 1, 1)
        std = torch.tensor(VIDEO_STD).view(3, 1, 1)
        return ((out - mean) / std).contiguous()


def build_video_transform(task: TaskConfig, model_cfg: ModelConfig | None, training: bool) -> VideoTransform:
    size = input_size(task, model_cfg)
    if training:
        if task.augment == "none":
            return VideoTransform(size, training=False, crops=1)
        return VideoTransform(size, training=True)
    return VideoTransform(size, training=False, crops=task.eval_crops)


class BatchMixup:
    """Mixup / CutMix on a collated classification batch (timm `Mixup`, soft targets).

    `batch.labels` [B] become float soft targets [B, C] (label smoothing folded in, so the loss
    must not smooth again); the visual segment is mixed in place of a copy. Randomness comes from
    the global generators, seeded by `seed` (one per training step) and restored afterwards.
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int, label_smoothing: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5) -> None:
        from timm.data import Mixup

        self.num_classes = num_classes
        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
                           switch_prob=switch_prob, label_smoothing=label_smoothing, num_classes=num_classes)

    def __call__(self, batch, seed: int | None = None):
        from dataclasses import replace

        from .rng import sample_rng

        if not kind_spec(batch.kind).mixup or batch.labels is None:
            raise ValueError(f"task {batch.task}: mixup/cutmix applies to classification batches with labels")
        seg = batch.inputs.segments[0]
        x = seg.data  # [B, T, C, H, W]
        b = x.shape[0]
        if b % 2:
            raise ValueError(f"task {batch.task}: mixup/cutmix needs an even batch size, got {b}")
        flat = x.reshape(b, -1, *x.shape[-2:]).clone()  # CutMix cuts the last two dims
        with sample_rng(seed):
            mixed, soft = self.mixup(flat, batch.labels.clone())
        new_seg = replace(seg, data=mixed.reshape(x.shape))
        inputs = replace(batch.inputs, segments=[new_seg] + list(batch.inputs.segments[1:]))
        return replace(batch, inputs=inputs, labels=soft.float(), label_smoothing=0.0)


def build_mixup(task: TaskConfig, num_classes: int) -> BatchMixup | None:
    """The task's Mixup/CutMix (None when both alphas are 0 or the task is not classification)."""
    if task.mixup <= 0 and task.cutmix <= 0:
        return None
    if not task_spec(task.type).mixup:
        raise ValueError(f"task {task.name}: mixup/cutmix is for image/video classification, not {task.type}")
    return BatchMixup(task.mixup, task.cutmix, num_classes, label_smoothing=task.label_smoothing)
