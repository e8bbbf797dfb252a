"""Official checkpoint formats -> our model: round trips and strictness."""
from pathlib import Path

import pytest
import torch

from uniperceiver.config import ModelConfig, ModelMoEConfig
from uniperceiver.convert.__main__ import main as convert_main
from uniperceiver.convert.api import convert_state_dict
from uniperceiver.convert.export import to_official_state_dict
from uniperceiver.convert.official import DS_RENAMES, ConversionError
from uniperceiver.modeling.model import UniPerceiver


def _model(moe: bool) -> UniPerceiver:
    torch.manual_seed(0)
    return UniPerceiver(ModelConfig(d_model=32, num_layers=2, num_heads=4, d_ffn=64, image_size=32,
                                    moe=ModelMoEConfig(enabled=moe)))


def _same(a: UniPerceiver, b: UniPerceiver) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("moe", [False, True])
def test_official_round_trip(moe):
    model = _model(moe)
    fmt = "official" if moe else "official-dense"
    converted, report = convert_state_dict(to_official_state_dict(model), fmt, num_heads=4)
    _same(model, converted)
    assert converted.cfg.moe.enabled == moe
    assert any("sin-cos" in d for d in report.dropped)


def test_deepspeed_names_and_visual_type_fold():
    model = _model(True)
    official = to_official_state_dict(model)
    official["video_embed.embeddings_type.weight"] = torch.full((1, 32), 0.5)
    ds = {}
    for key, value in official.items():  # invert the documented renaming table
        for old, new in reversed(DS_RENAMES):
            key = key.replace(new, old)
        ds[key] = value.reshape(1, 1, -1) if "residual_scale" in key else value
    ds["visual_embed.dummy"] = torch.zeros(1)
    converted, report = convert_state_dict(ds, "deepspeed", num_heads=4)
    expected = model.state_dict()
    expected["embed.patch.bias"] = expected["embed.patch.bias"] + 0.5
    for k, v in converted.state_dict().items():
        assert torch.allclose(v, expected[k]), k
    assert any("visual_embed.dummy" in d for d in report.dropped)


def _official():
    return to_official_state_dict(_model(True))


def test_missing_key_is_named():
    sd = _official()
    del sd["fused_encoder.layers.1.norm2.bias"]
    with pytest.raises(ConversionError, match=r"missing model keys[\s\S]*encoder.layers.1.norm2.bias"):
        convert_state_dict(sd, "official", num_heads=4)


def test_extra_key_is_named():
    sd = _official()
    sd["fused_encoder.layers.0.surprise.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError, match=r"unexpected official keys[\s\S]*layers.0.surprise.weight"):
        convert_state_dict(sd, "official", num_heads=4)


def test_wrong_shape_is_named():
    sd = _official()
    sd["loss_prepare.proj.bias"] = torch.zeros(31)
    with pytest.raises(ConversionError, match=r"shape mismatches[\s\S]*predictor.proj.bias: converted \(31,\) vs model \(32,\)"):
        convert_state_dict(sd, "official", num_heads=4)


def test_cli_writes_a_loadable_file(tmp_path: Path, capsys):
    model = _model(True)
    src, dst = tmp_path / "official.pth", tmp_path / "ours.pt"
    torch.save({"model": to_official_state_dict(model)}, src)
    assert convert_main(["--from", "official", str(src), str(dst), "--num-heads", "4"]) == 0
    _same(model, UniPerceiver.from_pretrained(dst))
    # a different size fails naming the keys
    other = tmp_path / "other.pt"
    torch.save({"config": {"d_model": 64, "num_heads": 4, "num_layers": 2, "d_ffn": 64, "image_size": 32},
                "model": model.state_dict()}, other)
    with pytest.raises(ValueError, match=r"other.pt: state dict does not match[\s\S]*wrong shape"):
        UniPerceiver.from_pretrained(other)
    # a corrupt file is reported with its name
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert convert_main(["--from", "official", str(bad), str(dst)]) == 2  # bad input (the exit-code convention)
    assert "bad.pth" in capsys.readouterr().err


@pytest.mark.parametrize("moe", [False, True])
def test_to_official_command_round_trips(tmp_path: Path, capsys, moe):
    """ours -> official (`--to official`) -> ours (the `--from` command it prints) is the same model."""
    import shlex

    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=2, d_ffn=64, image_size=48, patch_size=16,
                      posembed_scale=0.5, layer_scale_init=0.3, moe=ModelMoEConfig(enabled=moe))
    torch.manual_seed(1)
    model = UniPerceiver(cfg)
    ours, official, back = tmp_path / "ours.pt", tmp_path / "official.pth", tmp_path / "back.pt"
    model.save_pretrained(ours)
    assert convert_main(["--to", "official", str(ours), str(official)]) == 0
    printed = capsys.readouterr().out
    blob = torch.load(official, weights_only=True)
    assert set(blob) == {"model"} and "fused_encoder.layers.0.norm1.weight" in blob["model"]
    line = next(ln for ln in printed.splitlines() if ln.startswith("back: "))
    args = shlex.split(line)[4:]  # after `back: python -m uniperceiver.convert`
    assert args[:2] == ["--from", "official" if moe else "official-dense"]
    assert "--num-heads" in args and "posembed_scale=0.5" in args  # what the shapes cannot tell
    args[3] = str(back)
    assert convert_main(args) == 0
    restored = UniPerceiver.from_pretrained(back)
    _same(model, restored)
    assert restored.cfg == model.cfg
    # a file that is not ours fails naming it
    assert convert_main(["--to", "official", str(official), str(tmp_path / "x.pth")]) == 2  # bad input (the exit-code convention)
    assert "official.pth" in capsys.readouterr().err
