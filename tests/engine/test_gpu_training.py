"""GPU training-step pieces (opt-in: `pytest -m gpu`): bf16 autocast over fp32 master weights,
fused AdamW, attention on a fused SDPA kernel with the masks the model builds, MFU known."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from moe import MoEConfig
from uniperceiver.config import ModelConfig, ModelMoEConfig, OptimConfig
from uniperceiver.engine.flops import peak_flops
from uniperceiver.engine.optim import build_optimizer
from uniperceiver.modeling.attributes import task_attributes
from uniperceiver.modeling.batch import Segment, Sequence
from uniperceiver.modeling.model import UniPerceiver


@pytest.mark.gpu
@pytest.mark.parametrize("router", ["attribute", "token"])
def test_bf16_step_on_fused_attention_with_fused_adamw(router):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, num_layers=2, num_heads=4, d_ffn=128, image_size=32, layer_scale_init=1.0,
                      moe=ModelMoEConfig(enabled=True, routing=MoEConfig(router=router)))
    model = UniPerceiver(cfg).cuda().train()
    optimizer = build_optimizer(model, OptimConfig())
    assert optimizer.defaults["fused"]
    rows = task_attributes("image_caption")
    words = torch.randint(0, 49000, (4, 6))
    pad = torch.zeros(4, 12, dtype=torch.bool)
    pad[1, 9:] = True
    seq = Sequence([Segment("image", torch.randn(4, 3, 32, 32)),
                    Segment("text", torch.cat([words, torch.full_like(words, 49410)], 1), pad,
                            torch.arange(6).repeat(2))], attributes_SA=rows, caption_queries=True)
    seq = Sequence([s.to("cuda") for s in seq.segments], attributes_SA=rows.cuda(), caption_queries=True)
    # no math fallback allowed: the structured caption mask and the padding mask keep a fused kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model.encode(seq).hidden_BLD
        hidden.float().pow(2).mean().backward()
    optimizer.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert torch.isfinite(hidden).all()
    assert peak_flops("cuda", torch.bfloat16) is None or peak_flops("cuda", torch.bfloat16) > 1e12
