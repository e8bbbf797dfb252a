"""The MoE model against the dense model, and merged experts against their mixture."""
import torch

from uniperceiver.config import ModelConfig, ModelMoEConfig
from uniperceiver.modeling.attributes import task_attributes
from uniperceiver.modeling.batch import Segment, Sequence
from uniperceiver.modeling.model import UniPerceiver


def _cfg(moe: bool) -> ModelConfig:
    return ModelConfig(d_model=32, num_layers=2, num_heads=4, d_ffn=64, image_size=32, layer_scale_init=1.0,
                       drop_path=0.0, moe=ModelMoEConfig(enabled=moe))


def _seq() -> Sequence:
    text = torch.tensor([[320, 786, 49407, 0], [1237, 3255, 1453, 49407]])
    pad = text == 0
    return Sequence([Segment("image", torch.randn(2, 3, 32, 32)), Segment("text", text, pad)],
                    attributes_SA=task_attributes("image_caption"))


def test_moe_with_identical_experts_equals_dense():
    torch.manual_seed(0)
    dense, moe = UniPerceiver(_cfg(False)).eval(), UniPerceiver(_cfg(True)).eval()
    sd = moe.state_dict()
    for key, value in dense.state_dict().items():
        if key in sd:
            sd[key] = value
        else:  # dense sublayer weight -> every expert copy of it
            stem, leaf = key.rsplit(".", 1)
            sd[f"{stem}.{leaf}_EOI" if leaf == "weight" else f"{stem}.bias_EO"] = value.expand_as(
                sd[f"{stem}.weight_EOI" if leaf == "weight" else f"{stem}.bias_EO"]).clone()
    moe.load_state_dict(sd)
    seq = _seq()
    with torch.no_grad():
        assert torch.allclose(dense.encode(seq).hidden_BLD, moe.encode(seq).hidden_BLD, atol=1e-5)


def test_two_segments_use_their_own_experts():
    torch.manual_seed(0)
    model = UniPerceiver(_cfg(True)).eval()
    layer = model.encoder.layers[0]
    seq = _seq()
    x, _, lengths = model.embed_sequence(seq)
    ctx = model.routing_context(seq, lengths)
    assert ctx.segment_starts == (0, 1 + 4)  # [SPE] goes with the image segment
    y, decision = layer.fc1(x, ctx)
    for s, (a, b) in enumerate([(0, 5), (5, x.shape[1])]):
        mixture = sum(
            decision.gates_SK[s, k] * (x[:, a:b] @ layer.fc1.weight_EOI[e].T + layer.fc1.bias_EO[e])
            for k, e in enumerate(decision.expert_ids_SK[s].tolist())
        )
        assert torch.allclose(y[:, a:b], mixture, atol=1e-5)


def test_every_parameter_gets_a_gradient_in_training():
    torch.manual_seed(0)
    model = UniPerceiver(_cfg(True)).train()
    out = model.encode(_seq()).hidden_BLD
    feats = model.features(out[:, 0])
    (model.logits(feats, feats, "caption").sum() + out.sum()).backward()
    unused = {"predictor.logit_scale." + n for n in model.cfg.temperatures if n != "caption"}
    unused |= {"embed.temporal_pos.weight"}  # only frame 0 of an image: rows 1.. unused but param has grad
    missing = [n for n, p in model.named_parameters() if p.grad is None and n not in unused]
    assert not missing, missing


import pytest  # noqa: E402

from moe import MoEConfig  # noqa: E402
from uniperceiver.modeling.batch import TargetSet, TaskBatch  # noqa: E402
from uniperceiver.tasks import beam_search, run_task  # noqa: E402


@pytest.mark.parametrize("router", ["attribute", "task", "modality", "token", "context"])
def test_every_router_trains_and_decodes_through_the_model(router):
    """The model with each routing variant: a caption training step gives every routed parameter
    a gradient, and beam search (cached decoding) runs."""
    torch.manual_seed(0)
    routing = MoEConfig(router=router, num_experts=4, top_k=2, num_tasks=2, noise="none", dropless=True)
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=4, d_ffn=64, image_size=32, layer_scale_init=1.0,
                      drop_path=0.0, moe=ModelMoEConfig(enabled=True, routing=routing))
    model = UniPerceiver(cfg).train()
    words = torch.tensor([[320, 786, 49407], [1237, 49407, 0]])
    pad = torch.tensor([[0, 0, 0], [0, 0, 1]], dtype=torch.bool)
    text = torch.cat([words, torch.full_like(words, 49410)], 1)
    rows = task_attributes("image_caption")
    seq = Sequence([Segment("image", torch.randn(2, 3, 32, 32)),
                    Segment("text", text, torch.cat([pad, pad], 1), torch.arange(3).repeat(2))],
                   attributes_SA=rows, task_id=1, caption_queries=True)
    vocab = TargetSet("vocab", torch.tensor([[320, 49407], [786, 49407], [1237, 49407], [49407, 49407]]), None,
                      torch.tensor([[1.0, 1, 0, 1, 0, 1, 1, 0]]))
    labels = torch.tensor([[0, 1, 3], [2, 3, -1]])
    batch = TaskBatch("cap", "caption", "caption", seq, labels=labels, target_set="vocab")
    out = run_task(model, batch, {"vocab": model.encode_targets(vocab)})
    out.loss.backward()
    routed = [n for n, p in model.named_parameters() if ".router." in n and p.grad is None]
    assert not routed, routed
    model.eval()
    prefix = Sequence([Segment("image", torch.randn(2, 3, 32, 32))], attributes_SA=rows[:1], task_id=1)
    with torch.no_grad():
        res = beam_search(model, prefix, rows[1:], model.encode_targets(vocab), max_len=3,
                          vocab_token_ids_V=torch.tensor([320, 786, 1237, 49407]))
    assert res.ids_BT.shape == (2, 3)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=4, d_ffn=64, image_size=32, layer_scale_init=1.0,
                      drop_path=0.1, moe=ModelMoEConfig(enabled=True))
    model = UniPerceiver(cfg).train()
    seq = _seq()
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.encoder.activation_checkpointing = checkpointing
        torch.manual_seed(1)  # same drop-path and gate-noise draws in both runs
        out = model.encode(seq, temporal_offsets=[0]).hidden_BLD
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
