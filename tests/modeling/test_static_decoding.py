"""The static decoding step (GPU path, `uniperceiver.modeling.decoding`) gives today's caption ids,
merges the experts once per generation, compiles as one graph and never syncs with the host."""
import pytest
import torch

from moe import MoEConfig, MoELinear, RoutingContext
from uniperceiver.config import ModelConfig, ModelMoEConfig
from uniperceiver.modeling.attributes import task_attributes
from uniperceiver.modeling.batch import Segment, Sequence
from uniperceiver.modeling.decoding import StaticDecoder
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.tasks.captioning import EOT_ID, beam_search, beam_select

V = 300  # a vocabulary subset keeps the tests fast


def _setup(router="attribute", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=4, d_ffn=64, image_size=32, layer_scale_init=1.0,
                      moe=ModelMoEConfig(enabled=router is not None, routing=MoEConfig(router=router or "attribute")))
    model = UniPerceiver(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    ids_V = torch.cat([torch.randperm(49000, generator=gen)[: V - 1], torch.tensor([EOT_ID])])
    vocab_VD = torch.nn.functional.normalize(torch.randn(V, 32, generator=gen), dim=-1)
    rows = task_attributes("image_caption")
    prefix = Sequence([Segment("image", torch.randn(3, 3, 32, 32, generator=gen))], attributes_SA=rows[:1])
    return model, prefix, rows[1:], vocab_VD, ids_V


@pytest.mark.parametrize("router,beam,penalty", [("attribute", 2, 0.0), ("attribute", 3, 2.0), (None, 2, 1.0)])
def test_static_step_gives_the_eager_ids(router, beam, penalty):
    model, prefix, text_rows, vocab_VD, ids_V = _setup(router)
    kw = dict(beam_size=beam, max_len=7, len_penalty=penalty, vocab_token_ids_V=ids_V)
    ref = beam_search(model, prefix, text_rows, vocab_VD, static=False, **kw)
    got = beam_search(model, prefix, text_rows, vocab_VD, static=True, **kw)
    assert torch.equal(got.ids_BT, ref.ids_BT)
    torch.testing.assert_close(got.logprobs_BT, ref.logprobs_BT, rtol=1e-5, atol=1e-5)


def _count_merges(monkeypatch):
    calls = []
    real = MoELinear.merged_weights

    def counting(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MoELinear, "merged_weights", counting)
    return calls


@pytest.mark.parametrize("static", [False, True])
def test_experts_are_merged_once_per_generation(monkeypatch, static):
    model, prefix, text_rows, vocab_VD, ids_V = _setup()
    n_moe = sum(isinstance(m, MoELinear) for m in model.modules())
    assert n_moe > 0
    calls = _count_merges(monkeypatch)
    beam_search(model, prefix, text_rows, vocab_VD, beam_size=2, max_len=6, vocab_token_ids_V=ids_V, static=static)
    # the prefix encoding merges every MoE linear once; the 2 x 6 decoding calls together once more
    assert len(calls) == 2 * n_moe
    assert len(set(map(id, calls))) == n_moe


def _decoder_state(model, prefix, text_rows, vocab_VD, ids_V, beam=2, max_len=5):
    enc = model.encode(prefix, keep_kv=True)
    ctx = RoutingContext((0,), attributes_SA=text_rows, task_ids_S=torch.zeros(1, dtype=torch.long),
                         modality_ids_S=torch.ones(1, dtype=torch.long), merged_cache={})
    decoder = StaticDecoder(model, ctx, vocab_VD, "caption", beam, max_len, V - 1, ids_V, beam_select)
    state = decoder.start(enc.caches, prefix.batch_size)
    decoder.step(state, first=True)
    return decoder, state


@torch.no_grad()
def test_one_decoding_step_compiles_as_one_graph():
    model, prefix, text_rows, vocab_VD, ids_V = _setup()
    decoder, state = _decoder_state(model, prefix, text_rows, vocab_VD, ids_V)
    twin = type(state)(**{k: ([type(c)(c.key_BHMd.clone(), c.value_BHMd.clone()) for c in v] if k == "caches"
                              else v.clone()) for k, v in vars(state).items()})
    torch._dynamo.reset()
    step = torch.compile(decoder.step, fullgraph=True, backend="eager")  # raises on any graph break
    step(state, first=False)
    decoder.step(twin, first=False)
    assert torch.equal(state.ids_BKT, twin.ids_BKT)
    assert torch.equal(state.filled, twin.filled)
    torch.testing.assert_close(state.caches[-1].key_BHMd, twin.caches[-1].key_BHMd)
    torch._dynamo.reset()


@torch.no_grad()
def test_static_decoding_never_syncs(monkeypatch):
    model, prefix, text_rows, vocab_VD, ids_V = _setup()
    decoder, state = _decoder_state(model, prefix, text_rows, vocab_VD, ids_V)

    def boom(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"host sync: {name} in a decoding step")
        return raiser

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "cpu", "nonzero", "__int__", "__float__", "__bool__", "__index__"):
            m.setattr(torch.Tensor, name, boom(name))
        m.setattr(torch, "nonzero", boom("torch.nonzero"))
        for _ in range(3):
            decoder.step(state, first=False)
    assert int(state.filled) == prefix_len(model, prefix) + 4
    assert int(state.position[0]) == 4


def prefix_len(model, prefix):
    return 1 + model.embed_sequence(prefix)[0].shape[1] - 1


@pytest.mark.gpu
@pytest.mark.parametrize("router", ["attribute", "token"])
def test_cuda_graph_decoding_gives_the_eager_ids(router):
    model, prefix, text_rows, vocab_VD, ids_V = _setup(router)
    model = model.cuda()
    prefix = Sequence([Segment("image", prefix.segments[0].data.cuda())], attributes_SA=prefix.attributes_SA.cuda())
    kw = dict(beam_size=2, max_len=8, len_penalty=1.0, vocab_token_ids_V=ids_V.cuda())
    ref = beam_search(model, prefix, text_rows.cuda(), vocab_VD.cuda(), static=False, **kw)
    got = beam_search(model, prefix, text_rows.cuda(), vocab_VD.cuda(), static=True, cuda_graphs=True, **kw)
    assert torch.equal(got.ids_BT, ref.ids_BT)
    torch.testing.assert_close(got.logprobs_BT, ref.logprobs_BT, rtol=1e-4, atol=1e-4)
