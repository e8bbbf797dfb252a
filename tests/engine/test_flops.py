"""Model FLOPs of the encoder (checked against torch's FLOP counter) and MFU."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from moe import MoEConfig, RoutingContext
from uniperceiver.config import ModelConfig, ModelMoEConfig
from uniperceiver.engine.flops import encoder_flops, mfu, peak_flops
from uniperceiver.modeling.encoder import Encoder


def _cfg(**moe):
    return ModelConfig(d_model=32, num_layers=3, num_heads=4, d_ffn=64, image_size=32,
                       moe=ModelMoEConfig(enabled=bool(moe), routing=MoEConfig(**moe) if moe else MoEConfig()))


def _attention_as_matmuls(q, k, v, attn_mask=None, **_):
    # the math of SDPA in counted matmuls (the fused CPU kernel has no FLOP formula registered)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("training", [False, True])
def test_dense_encoder_flops_equal_torch_flop_counter(monkeypatch, training):
    monkeypatch.setattr(F, "scaled_dot_product_attention", _attention_as_matmuls)
    cfg = _cfg()
    torch.manual_seed(0)
    encoder = Encoder(cfg)
    x = torch.randn(3, 10, 32, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        y = encoder(x, RoutingContext()).hidden_BLD
        if training:
            y.sum().backward()
    assert counter.get_total_flops() == encoder_flops(cfg, 3, 10, training=training)


def test_moe_flops_follow_the_routing():
    dense = encoder_flops(_cfg(), 4, 50, training=False)
    # attribute routing: one merged linear per segment plus the merge (top_k weights per segment)
    merged = encoder_flops(_cfg(router="attribute", top_k=2), 4, 50, num_segments=2, training=False)
    d, f = 32, 64
    moe_layers = 2  # layers 0 and 2 of 3 ("even")
    merge = moe_layers * 2 * 2 * (3 * d * d + d * d + d * f + f * d) * 2  # 2 FLOPs x top-2 x weights x segments
    assert merged == pytest.approx(dense + merge)
    # token routing top-2: every routed sublayer runs twice
    token = encoder_flops(_cfg(router="token", top_k=2), 4, 50, training=False)
    extra = moe_layers * 200 * 2 * (3 * d * d + d * d + d * f + f * d)
    assert token == pytest.approx(dense + extra)


def test_mfu_and_peak():
    assert mfu(1e12, 2.0, 1e12) == pytest.approx(0.5)
    assert mfu(1e12, 2.0, None) is None
    assert peak_flops("cpu") is None


def test_trainer_logs_model_flops_and_compiles_layers_on_request(tmp_path, monkeypatch):
    import json

    from engine_utils import write_tiny_run
    from uniperceiver.config import RunConfig, load_config
    from uniperceiver.engine.trainer import Trainer

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    cfg = load_config(RunConfig, write_tiny_run(tmp_path, max_steps=2, checkpoint_every=2), ["train.compile=true"])
    trainer = Trainer(cfg)
    assert compiled == list(trainer.model.encoder.layers)
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert rows and all(r["model_tflops_per_s"] > 0 for r in rows)
    assert all(r["mfu"] is None for r in rows)  # no known peak on a CPU


def test_train_compile_key_is_validated(tmp_path):
    from engine_utils import write_tiny_run
    from uniperceiver.config import RunConfig, load_config

    with pytest.raises(Exception, match="compile"):
        load_config(RunConfig, write_tiny_run(tmp_path), ["train.compile=maybe"])


def test_encoder_layer_compiles_as_one_graph_in_training():
    """What `train.compile=true` compiles: one MoE encoder layer, forward and backward, no break."""
    from uniperceiver.modeling.encoder import EncoderLayer, SequenceGroup, TokenLayout

    torch.manual_seed(0)
    layer = EncoderLayer(_cfg(router="attribute", noise="none"), 0, 0.0).train()
    x = torch.randn(2, 6, 32, requires_grad=True)
    ctx = RoutingContext((0, 2), attributes_SA=torch.eye(8)[:2])
    groups = [SequenceGroup(x, ctx)]
    layout = TokenLayout.build(groups)  # the joint row of the encoder's one call (one group here)
    x_TD = layout.flatten(groups)
    torch._dynamo.reset()
    y, _, _ = torch.compile(layer, fullgraph=True, backend="eager")(x_TD, layout, 0, False, "l0")
    y_ref, _, _ = layer(x_TD, layout, 0, False, "l0")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert layer.fc1.weight_EOI.grad is not None
    torch._dynamo.reset()
