"""Per-task dense export: merged weights per attribute row equal the MoE model on its task."""
import pytest
import torch

from uniperceiver.config import ModelConfig, ModelMoEConfig
from uniperceiver.convert.__main__ import main as convert_main
from uniperceiver.convert.task_export import ExportError, export_task, task_rows
from uniperceiver.modeling.attributes import target_set_attributes, task_attributes
from uniperceiver.modeling.batch import Segment, Sequence, TargetSet
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.tasks import beam_search


def _model(router: str = "attribute") -> UniPerceiver:
    from moe import MoEConfig

    torch.manual_seed(0)
    routing = MoEConfig(router=router, noise="none") if router != "attribute" else MoEConfig()
    return UniPerceiver(ModelConfig(d_model=32, num_layers=2, num_heads=4, d_ffn=64, image_size=32,
                                    layer_scale_init=1.0, drop_path=0.0,
                                    moe=ModelMoEConfig(enabled=True, routing=routing))).eval()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_exported_caption_model_equals_the_moe_model(tmp_path):
    model = _model()
    exported = export_task(model, "image_caption")
    assert exported.cfg.moe.routing.num_experts == 3 == task_rows("image_caption").shape[0]
    assert not any("router" in k for k in exported.state_dict())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(exported) < count(model)
    torch.manual_seed(1)
    image = Segment("image", torch.randn(2, 3, 32, 32))
    text = torch.tensor([[320, 786, 49407, 0, 49410, 49410, 49410, 49410]] * 2)
    train_seq = Sequence([image, Segment("text", text, text == 0, torch.arange(4).repeat(2))],
                         attributes_SA=task_attributes("image_caption"), caption_queries=True)
    vocab = TargetSet("v", torch.tensor([[v, 49407] for v in (320, 786, 1237, 49407)]), None,
                      attributes_SA=target_set_attributes("vocabulary"))
    with torch.no_grad():
        assert _rel(exported.encode(train_seq).hidden_BLD, model.encode(train_seq).hidden_BLD) < 1e-5
        feats, feats_x = model.encode_targets(vocab), exported.encode_targets(vocab)
        assert _rel(feats_x, feats) < 1e-5
        prefix = Sequence([image], attributes_SA=task_attributes("image_caption")[:1])
        rows = task_attributes("image_caption")[1:]
        ids = torch.tensor([320, 786, 1237, 49407])
        ref = beam_search(model, prefix, rows, feats, max_len=3, vocab_token_ids_V=ids)
        out = beam_search(exported, prefix, rows, feats_x, max_len=3, vocab_token_ids_V=ids)
    assert torch.equal(out.ids_BT, ref.ids_BT) and _rel(out.logprobs_BT, ref.logprobs_BT) < 1e-5
    # another task's rows are refused by the exported model
    with pytest.raises(ValueError, match="not one this model was exported for"):
        exported.encode(Sequence([Segment("text", text[:, :3])], attributes_SA=task_attributes("text_mlm")))


def test_export_cli_prints_both_counts_and_refuses_token_routers(tmp_path, capsys):
    _model().save_pretrained(tmp_path / "moe.pt")
    assert convert_main(["--export-task", "image_classification", str(tmp_path / "moe.pt"), str(tmp_path / "cls.pt")]) == 0
    printed = capsys.readouterr().out
    assert "MoE model" in printed and "image_classification model" in printed
    loaded = UniPerceiver.from_pretrained(tmp_path / "cls.pt").eval()
    model = UniPerceiver.from_pretrained(tmp_path / "moe.pt").eval()
    seq = Sequence([Segment("image", torch.randn(2, 3, 32, 32))], attributes_SA=task_attributes("image_classification"))
    with torch.no_grad():
        assert _rel(loaded.encode(seq).hidden_BLD, model.encode(seq).hidden_BLD) < 1e-5

    _model("token").save_pretrained(tmp_path / "token.pt")
    assert convert_main(["--export-task", "image_classification", str(tmp_path / "token.pt"), str(tmp_path / "x.pt")]) == 2
    assert "depends on the tokens" in capsys.readouterr().err
    with pytest.raises(ExportError, match="unknown task type"):
        export_task(_model(), "nope")
