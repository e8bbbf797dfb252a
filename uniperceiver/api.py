"""A few-line Python API for the common zero-shot uses.

    from uniperceiver.api import load_model, classify_images, rank_captions, caption_image

    model = load_model("base_moe.pth")                     # a converted/saved model or a training checkpoint
    model = load_model("base_moe.pth", adapter="adapter.pt")   # + a prompt-tuning adapter of that base
    probs = classify_images(model, ["cat.jpg", "dog.jpg"], ["cat", "dog", "car"])   # [2, 3]
    scores = rank_captions(model, ["cat.jpg"], ["a cat on a sofa", "a red car"])    # [1, 2] cosine
    text = caption_image(model, "cat.jpg")                 # beam 2, max 21 tokens, length penalty 2.0

Images are PIL images, paths, or already-transformed tensors [3, S, S]. They get the evaluation
transforms of the release (classification: Resize(256/224 S) + CenterCrop S; retrieval and
captions: Resize S + CenterCrop S; ImageNet mean/std), where S is the model's image size. Class
names are encoded as `name <|endoftext|>` with no prompt template, as the release. Inputs and
targets are routed with the attribute rows of their task (`uniperceiver.modeling.attributes`).

The vocabulary features that captioning needs (49,411 encoded entries) are computed once per
model and reused while its weights are unchanged.
"""
from __future__ import annotations

import os
import weakref
from collections.abc import Sequence as Seq
from typing import Union

import torch
from PIL import Image
from torch import Tensor

from .data.target_sets import vocabulary_target_set
from .modeling.attributes import target_set_attributes, task_attributes
from .modeling.batch import Segment, Sequence, TargetSet
from .modeling.model import UniPerceiver
from .tasks.captioning import beam_search
from .utils.task_registry import task_spec
from .tokenization import ClipTokenizer

__all__ = [
    "caption_image",
    "caption_images",
    "classify_images",
    "encode_images",
    "encode_texts",
    "load_model",
    "rank_captions",
    "vocabulary_target_set",
]

ImageLike = Union[Image.Image, str, os.PathLike, Tensor]

_TOKENIZER: list[ClipTokenizer] = []


def _tokenizer() -> ClipTokenizer:
    if not _TOKENIZER:
        _TOKENIZER.append(ClipTokenizer())
    return _TOKENIZER[0]


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               adapter: str | os.PathLike | None = None) -> UniPerceiver:
    """A model file (`save_pretrained`, `python -m uniperceiver.convert`), a training checkpoint
    ({'model', 'config'}) or a sharded run's checkpoint directory, in eval mode with the evaluation
    settings (MoE layers dropless); `uniperceiver.modeling.checkpoint.load_model` reads them.
    `adapter`: an adapter file trained on this base (prompt tuning), loaded on top; another
    base's is refused."""
    from .engine.dcp import consolidate_model_state  # a sharded run's distributed checkpoint
    from .modeling.checkpoint import load_model as _load

    return _load(path, device=device, read_sharded=consolidate_model_state, adapter=adapter)


# ----------------------------------------------------------------------------- inputs
def _device(model: UniPerceiver) -> torch.device:
    return next(model.parameters()).device


def _pixels(model: UniPerceiver, images: Seq[ImageLike], task_type: str) -> Tensor:
    """Images -> normalised pixels [B, 3, S, S] with the release's eval transform of the task type."""
    from .data.transforms import clip_transform, imagenet_transform

    if isinstance(images, (str, os.PathLike, Tensor)) or hasattr(images, "convert"):
        raise TypeError("pass a list of images (PIL images, paths or tensors), not a single image")
    size = model.cfg.image_size
    imagenet = task_spec(task_type).image_pipeline == "imagenet"
    transform = imagenet_transform(size, False) if imagenet else clip_transform(size, False)
    out = []
    for i, img in enumerate(images):
        if isinstance(img, Tensor):
            if img.shape != (3, size, size):
                raise ValueError(f"image {i}: tensor of shape {tuple(img.shape)}, expected [3, {size}, {size}] "
                                 "(or pass a PIL image / path to get the eval transform)")
            out.append(img.float())
            continue
        if isinstance(img, (str, os.PathLike)):
            if not os.path.isfile(img):
                raise FileNotFoundError(f"image {i}: {img} does not exist")
            try:
                with Image.open(img) as f:
                    img = f.convert("RGB")
            except OSError as e:
                raise ValueError(f"image {i}: {img} could not be read as an image ({e})") from e
        out.append(transform(img.convert("RGB")))
    if not out:
        raise ValueError("no images given")
    return torch.stack(out)


def _visual(model: UniPerceiver, pixels_BCHW: Tensor, rows_SA: Tensor) -> Sequence:
    return Sequence([Segment("image", pixels_BCHW.to(_device(model)))], attributes_SA=rows_SA)


def encode_texts(model: UniPerceiver, texts: Seq[str], rows_SA: Tensor, *, batch_size: int = 256,
                 max_len: int | None = None) -> Tensor:
    """Unit-norm [SPE] features of `text <|endoftext|>` sequences -> [N, D]."""
    if isinstance(texts, str) or not texts:
        raise ValueError("pass a non-empty list of strings")
    ids_NL, pad_NL = _tokenizer().batch_encode(list(texts), append_eot=True, max_len=max_len)
    ts = TargetSet("texts", ids_NL, pad_NL, attributes_SA=rows_SA)
    with torch.no_grad():
        return model.encode_targets(_to_device(ts, _device(model)), chunk_size=batch_size)


def encode_images(model: UniPerceiver, images: Seq[ImageLike], *, task: str = "image_retrieval",
                  batch_size: int = 32) -> Tensor:
    """Unit-norm [SPE] features of images -> [B, D] (routed as the inputs of `task`)."""
    pixels = _pixels(model, images, task)
    rows = task_attributes(task, "input")
    feats = []
    with torch.no_grad():
        for start in range(0, pixels.shape[0], batch_size):
            enc = model.encode(_visual(model, pixels[start : start + batch_size], rows))
            feats.append(model.features(enc.hidden_BLD[:, 0]))
    return torch.cat(feats)


def _to_device(ts: TargetSet, device: torch.device) -> TargetSet:
    return TargetSet(ts.name, ts.ids_NL.to(device), None if ts.padding_mask_NL is None else ts.padding_mask_NL.to(device),
                     ts.attributes_SA, ts.task_id)


# ----------------------------------------------------------------------------- the three uses
def classify_images(model: UniPerceiver, images: Seq[ImageLike], class_names: Seq[str], *,
                    batch_size: int = 32) -> Tensor:
    """Zero-shot classification: softmax over the class names -> probabilities [B, C] (CPU)."""
    class_feats_CD = encode_texts(model, class_names, target_set_attributes("class_names"))
    image_feats_BD = encode_images(model, images, task="image_classification", batch_size=batch_size)
    with torch.no_grad():
        return model.logits(image_feats_BD, class_feats_CD, "img_cls").softmax(-1).cpu()


def rank_captions(model: UniPerceiver, images: Seq[ImageLike], captions: Seq[str], *,
                  batch_size: int = 32) -> Tensor:
    """Image-text similarity [I, T] (cosine; sort a row descending to rank captions for an image)."""
    text_feats_TD = encode_texts(model, captions, task_attributes("image_retrieval", "target"))
    image_feats_ID = encode_images(model, images, task="image_retrieval", batch_size=batch_size)
    return (image_feats_ID @ text_feats_TD.t()).cpu()


# model -> (weights stamp, device, features): valid while no parameter was modified in place
_VOCAB: "weakref.WeakKeyDictionary[UniPerceiver, tuple]" = weakref.WeakKeyDictionary()


def _weights_stamp(model: UniPerceiver) -> tuple:
    return tuple((id(p), p._version) for p in model.parameters())


def _vocab_features(model: UniPerceiver, chunk_size: int) -> Tensor:
    device = _device(model)
    stamp = _weights_stamp(model)
    hit = _VOCAB.get(model)
    if hit is not None and hit[0] == stamp and hit[1] == device:
        return hit[2]
    from .evaluation.target_features import TargetFeatures

    feats = TargetFeatures(model, chunk_size=chunk_size, progress=False).encode(
        _to_device(vocabulary_target_set(model.cfg.vocab_size), device))
    _VOCAB[model] = (stamp, device, feats)
    return feats


def caption_images(model: UniPerceiver, images: Seq[ImageLike], *, beam_size: int = 2, max_len: int = 21,
                   len_penalty: float = 2.0, batch_size: int = 16, vocab_chunk_size: int = 4096) -> list[str]:
    """Captions by beam search with the key/value cache (the zero-shot COCO settings by default)."""
    pixels = _pixels(model, images, "image_caption")
    rows = task_attributes("image_caption", "input")
    vocab_VD = _vocab_features(model, vocab_chunk_size)
    tok = _tokenizer()
    out: list[str] = []
    for start in range(0, pixels.shape[0], batch_size):
        prefix = _visual(model, pixels[start : start + batch_size], rows[:1])
        res = beam_search(model, prefix, rows[1:], vocab_VD, temperature="caption", beam_size=beam_size,
                          max_len=max_len, len_penalty=len_penalty)
        out.extend(tok.decode(ids.cpu(), stop_at_eot=True).strip() for ids in res.ids_BT)
    return out


def caption_image(model: UniPerceiver, image: ImageLike, **kwargs) -> str:
    """One caption for one image (keyword arguments as `caption_images`)."""
    return caption_images(model, [image], **kwargs)[0]
