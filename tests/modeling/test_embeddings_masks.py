"""Sin-cos table, [SPE], text/visual embeddings and attention masks."""
import math

import torch

from uniperceiver.config import ModelConfig
from uniperceiver.modeling.batch import Segment, Sequence
from uniperceiver.modeling.embeddings import SPE_ID, sincos_2d_table
from uniperceiver.modeling.model import UniPerceiver

TINY = dict(d_model=32, num_layers=2, num_heads=4, d_ffn=64, image_size=32)


def test_sincos_table_matches_formula():
    grid, dim, scale = 3, 16, 160 / 224
    table = sincos_2d_table(grid, dim, scale)
    q = dim // 4
    for n in range(grid * grid):
        i, j = n // grid, n % grid
        for k in range(q):
            w = 10000 ** (-k / q)
            expected = [math.sin(scale * i * w), math.cos(scale * i * w), math.sin(scale * j * w), math.cos(scale * j * w)]
            got = [table[n, k], table[n, q + k], table[n, 2 * q + k], table[n, 3 * q + k]]
            assert all(abs(float(g) - e) < 1e-6 for g, e in zip(got, expected))


def test_spe_has_no_position_or_type():
    model = UniPerceiver(ModelConfig(**TINY)).eval()
    spe = model.embed.spe(2)
    expected = model.embed.norm(model.embed.word.weight[SPE_ID])
    assert torch.allclose(spe[0, 0], expected) and spe.shape == (2, 1, 32)
    # text position restarts at 0 inside every segment
    ids = torch.tensor([[5, 6, 7]])
    x = model.embed.text(ids)
    manual = model.embed.norm(model.embed.word(ids) + model.embed.text_pos.weight[:3] + model.embed.text_type.weight[0])
    assert torch.allclose(x, manual)


def test_visual_tokens_are_frame_major_with_temporal_offset():
    model = UniPerceiver(ModelConfig(**TINY)).eval()
    video = torch.randn(1, 2, 3, 32, 32)
    base = model.embed.visual(video, temporal_offset=0)
    shifted = model.embed.visual(video, temporal_offset=3)
    assert base.shape == (1, 2 * 4, 32)
    assert not torch.allclose(base, shifted)
    # frame 1 alone at offset 1 equals tokens 4..7 of the 2-frame clip at offset 0
    assert torch.allclose(model.embed.visual(video[:, 1:], temporal_offset=1), base[:, 4:], atol=1e-6)


def test_caption_mask_structure():
    image = Segment("image", torch.zeros(2, 3, 32, 32))
    t = 3
    words = torch.tensor([[11, 12, 49407, 49410, 49410, 49410], [11, 49407, 0, 49410, 49410, 0]])
    pad = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 1]], dtype=torch.bool)
    seq = Sequence([image, Segment("text", words, pad, torch.arange(t).repeat(2))], caption_queries=True)
    x, pad_bl, lengths = UniPerceiver(ModelConfig(**TINY)).embed_sequence(seq)
    allowed = UniPerceiver.attention_mask(seq, pad_bl, lengths)
    prefix = 1 + 4
    a = allowed[0, 0]
    assert a.shape == (prefix + 2 * t, prefix + 2 * t)
    assert a[:, :prefix].all()  # everyone sees [SPE] + image
    assert not a[:prefix, prefix:].any()  # the prefix sees only itself
    for i in range(t):
        for j in range(t):
            assert bool(a[prefix + i, prefix + j]) == (j <= i)  # word i sees words <= i
            assert bool(a[prefix + t + i, prefix + j]) == (j < i)  # query i sees words < i
            assert bool(a[prefix + t + i, prefix + t + j]) == (j == i)  # ... and itself only
    # padding of sample 1 is masked as a key everywhere
    b = allowed[1, 0]
    assert not b[:, prefix + 2].any() and not b[:, prefix + 2 * t - 1].any()
