"""The encoder's routed FFN is the MoE library's (moe.routed_ffn): model.moe.routing.expert_type
selects linear experts (merged) or whole-FFN experts (exact mixture), and decisions share one
interface."""
import pytest
import torch
import torch.nn.functional as F

from moe import Decision, MoEConfig, RoutingContext, SegmentDecision
from uniperceiver.config import ModelConfig, ModelMoEConfig
from uniperceiver.engine.logger import moe_stats
from uniperceiver.modeling.attributes import task_attributes
from uniperceiver.modeling.batch import Segment, Sequence
from uniperceiver.modeling.model import UniPerceiver


def _model(expert_type: str, router: str = "attribute") -> UniPerceiver:
    torch.manual_seed(0)
    routing = MoEConfig(router=router, num_experts=4, top_k=2, noise="none", dropless=True, expert_type=expert_type)
    return UniPerceiver(ModelConfig(d_model=32, num_layers=2, num_heads=4, d_ffn=64, image_size=32,
                                    drop_path=0.0, moe=ModelMoEConfig(enabled=True, routing=routing))).eval()


def test_whole_ffn_experts_compute_the_mixture_of_expert_ffns():
    model = _model("ffn")
    layer = model.encoder.layers[0]
    x_1TD = torch.randn(1, 10, 32)
    ctx = RoutingContext(segment_starts=(0, 4), attributes_SA=task_attributes("image_caption"))
    y_1TD, decisions = layer._ffn(x_1TD, ctx, "layers.0")
    (_, decision), = decisions
    assert isinstance(decision, SegmentDecision)
    w1, b1, w2, b2 = layer.fc1.weight_EOI, layer.fc1.bias_EO, layer.fc2.weight_EOI, layer.fc2.bias_EO
    want = torch.zeros_like(x_1TD)
    for s, (lo, hi) in enumerate([(0, 4), (4, 10)]):
        for k in range(2):
            e, g = int(decision.expert_ids_SK[s, k]), decision.gates_SK[s, k]
            want[:, lo:hi] += g * F.linear(F.gelu(F.linear(x_1TD[:, lo:hi], w1[e], b1[e])), w2[e], b2[e])
    torch.testing.assert_close(y_1TD, want, rtol=1e-5, atol=1e-6)
    # ... which is not what linear experts (merged weights) compute with the same parameters.
    linear = _model("linear")
    linear.load_state_dict(model.state_dict())
    y_linear, _ = linear.encoder.layers[0]._ffn(x_1TD, ctx, "layers.0")
    assert not torch.allclose(y_linear, y_1TD, atol=1e-4)


def test_whole_ffn_experts_train_through_the_model():
    for router in ("attribute", "token"):
        model = _model("ffn", router).train()
        seq = Sequence([Segment("image", torch.randn(2, 3, 32, 32)), Segment("text", torch.tensor([[320, 49407]] * 2))],
                       attributes_SA=task_attributes("image_caption"))
        out = model.encode(seq)
        out.hidden_BLD.square().mean().backward()
        assert model.encoder.layers[0].fc2.weight_EOI.grad.abs().sum() > 0
        names = [n for n, _ in out.decisions]
        assert "layers.0.fc1" in names and "layers.0.fc2" not in names  # one decision per FFN
        assert all(isinstance(d, Decision) for _, d in out.decisions)
        stats = moe_stats(out.decisions)
        assert any(k.endswith("gate_entropy") for k in stats)


def test_whole_ffn_experts_need_fc1_and_fc2_sharing_one_decision():
    routing = MoEConfig(expert_type="ffn")
    with pytest.raises(ValueError, match="expert_type=ffn needs fc1 and fc2"):
        ModelMoEConfig(enabled=True, sublayers=["qkv", "attn_out", "fc1"], share_decisions=False, routing=routing)
    with pytest.raises(ValueError, match="expert_type=ffn needs fc1 and fc2"):
        ModelMoEConfig(enabled=True, share_decisions=False, routing=routing)
