"""The Python API: zero-shot classification, caption ranking and captioning of PIL images/paths,
consistent with the model called by hand; the vocabulary is encoded once per model."""
import pytest
import torch
from PIL import Image

import eval_fakes as F
from uniperceiver import api
from uniperceiver.evaluation.target_features import TargetFeatures
from uniperceiver.modeling.attributes import target_set_attributes, task_attributes
from uniperceiver.modeling.batch import Segment, Sequence
from uniperceiver.tokenization import ClipTokenizer


@pytest.fixture(scope="module")
def model():
    return F.tiny_model(seed=1)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, size in enumerate([(40, 50), (64, 48)]):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
        path = folder / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        out.append(path)
    return out


def test_classify_images_matches_manual(model, images):
    names = ["cat", "dog", "red car"]
    probs = api.classify_images(model, [str(images[0]), Image.open(images[1])], names)
    assert probs.shape == (2, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(2))

    # by hand: Resize(256/224 S) + CenterCrop(S), ImageNet mean/std, classification rows
    from uniperceiver.data.transforms import imagenet_transform

    t = imagenet_transform(model.cfg.image_size, training=False)
    pixels = torch.stack([t(Image.open(p).convert("RGB")) for p in images])
    tok = ClipTokenizer()
    ids, pad = tok.batch_encode(names, append_eot=True)
    with torch.no_grad():
        img = model.features(model.encode(Sequence([Segment("image", pixels)],
                                                   attributes_SA=task_attributes("image_classification"))).hidden_BLD[:, 0])
        txt = model.features(model.encode(Sequence([Segment("text", ids, pad)],
                                                   attributes_SA=target_set_attributes("class_names"))).hidden_BLD[:, 0])
        ref = model.logits(img, txt, "img_cls").softmax(-1)
    torch.testing.assert_close(probs, ref)


def test_rank_captions_and_caption_image(model, images, monkeypatch):
    scores = api.rank_captions(model, images, ["a cat", "a dog on grass", "two cars"])
    assert scores.shape == (2, 3) and bool((scores.abs() <= 1 + 1e-5).all())

    calls = []
    original = TargetFeatures.encode
    monkeypatch.setattr(TargetFeatures, "encode", lambda self, ts: calls.append(ts.name) or original(self, ts))
    first = api.caption_image(model, images[0], max_len=4)
    both = api.caption_images(model, images, max_len=4)
    assert isinstance(first, str) and both[0] == first
    assert calls == ["Vocab_Word"]  # encoded once for the model, reused by the next call
    # changing the weights in place invalidates the cached vocabulary (not re-encoded for real)
    fake = lambda self, ts: calls.append(ts.name) or torch.nn.functional.normalize(  # noqa: E731
        torch.randn(len(ts), model.cfg.d_model), dim=-1)
    monkeypatch.setattr(TargetFeatures, "encode", fake)
    api.caption_image(model, images[0], max_len=2)
    assert calls == ["Vocab_Word"]
    with torch.no_grad():
        model.predictor.proj.bias.add_(0.0)
    api.caption_image(model, images[0], max_len=2)
    assert calls == ["Vocab_Word", "Vocab_Word"]


def test_api_input_errors(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg does not exist"):
        api.classify_images(model, [str(tmp_path / "missing.jpg")], ["a"])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg could not be read"):
        api.rank_captions(model, [bad], ["a"])
    with pytest.raises(TypeError, match="list of images"):
        api.classify_images(model, str(bad), ["a"])
    with pytest.raises(ValueError, match=r"expected \[3, 32, 32\]"):
        api.classify_images(model, [torch.zeros(3, 8, 8)], ["a"])


def test_load_model_round_trip(model, tmp_path):
    path = tmp_path / "m.pt"
    model.save_pretrained(path)
    loaded = api.load_model(path)
    assert loaded.cfg.moe.routing.dropless
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
