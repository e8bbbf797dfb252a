"""Incremental decoding with the key/value cache equals full recomputation."""
import torch

from moe import RoutingContext
from uniperceiver.config import ModelConfig, ModelMoEConfig
from uniperceiver.modeling.attributes import task_attributes
from uniperceiver.modeling.batch import Segment, Sequence
from uniperceiver.modeling.model import UniPerceiver


def _model(moe: bool) -> UniPerceiver:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=4, d_ffn=64, image_size=32, layer_scale_init=1.0,
                      moe=ModelMoEConfig(enabled=moe))
    return UniPerceiver(cfg).eval()


def _check(moe: bool) -> None:
    model = _model(moe)
    rows = task_attributes("image_caption")
    image = Segment("image", torch.randn(2, 3, 32, 32))
    words = torch.tensor([[320, 786, 6765, 49407], [1237, 3255, 1453, 593]])
    t = words.shape[1]
    text = torch.cat([words, torch.full_like(words, 49410)], 1)
    full_seq = Sequence([image, Segment("text", text, None, torch.arange(t).repeat(2))],
                        attributes_SA=rows, caption_queries=True)
    with torch.no_grad():
        full = model.encode(full_seq).hidden_BLD
        prefix = model.encode(Sequence([image], attributes_SA=rows[:1]), keep_kv=True)
        caches = prefix.caches
        ctx = RoutingContext((0,), attributes_SA=rows[1:], task_ids_S=torch.zeros(1, dtype=torch.long),
                             modality_ids_S=torch.ones(1, dtype=torch.long))
        p = prefix.hidden_BLD.shape[1]
        assert torch.allclose(prefix.hidden_BLD, full[:, :p], atol=1e-5)
        for i in range(t):
            query = model.decode_step(torch.full((2,), 49410), i, caches, ctx, keep_kv=False)
            assert torch.allclose(query.hidden_BLD[:, 0], full[:, p + t + i], atol=1e-5), i
            word = model.decode_step(words[:, i], i, caches, ctx, keep_kv=True)
            assert torch.allclose(word.hidden_BLD[:, 0], full[:, p + i], atol=1e-5), i
            caches = [type(c)(torch.cat([c.key_BHMd, n.key_BHMd], 2), torch.cat([c.value_BHMd, n.value_BHMd], 2))
                      for c, n in zip(caches, word.caches)]


def test_cached_decoding_equals_full_recomputation_dense():
    _check(moe=False)


def test_cached_decoding_equals_full_recomputation_moe():
    _check(moe=True)
