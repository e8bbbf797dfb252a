"""Adapter files: save what a prompt-tuned model trained, load it onto its base, refuse other bases."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uniperceiver.config import ModelConfig, ModelMoEConfig, PromptConfig
from uniperceiver.modeling.adapter import AdapterError, save_adapter
from uniperceiver.modeling.freezing import apply_trainable, trainable_substrings
from uniperceiver.modeling.model import UniPerceiver

REPO = Path(__file__).resolve().parents[2]


def _base_cfg() -> ModelConfig:
    return ModelConfig(d_model=32, num_layers=2, num_heads=4, d_ffn=64, image_size=32, layer_scale_init=1.0,
                       drop_path=0.0, moe=ModelMoEConfig(enabled=True))


def _tuned(base: UniPerceiver) -> UniPerceiver:
    cfg = _base_cfg()
    cfg.prompt = PromptConfig(enabled=True, input_length=4, shared=False, target_length=2, fc_prompt_out=3)
    tuned = UniPerceiver(cfg)
    tuned.load_state_dict(base.state_dict(), strict=False)
    apply_trainable(tuned, trainable_substrings(cfg, None))
    with torch.no_grad():  # "training": every trainable tensor moves
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return tuned


def test_adapter_round_trips_and_is_refused_for_another_base(tmp_path):
    torch.manual_seed(0)
    base = UniPerceiver(_base_cfg())
    base.save_pretrained(tmp_path / "base.pt")
    tuned = _tuned(base)
    info = save_adapter(tuned, tmp_path / "adapter.pt")
    trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    assert info["numel"] == trainable and info["numel"] < sum(p.numel() for p in base.parameters()) / 20
    assert (tmp_path / "adapter.pt").stat().st_size < (tmp_path / "base.pt").stat().st_size / 10

    loaded = UniPerceiver.from_pretrained(tmp_path / "base.pt", adapter=tmp_path / "adapter.pt")
    assert loaded.cfg.prompt == tuned.cfg.prompt
    for key, value in tuned.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    other = UniPerceiver(_base_cfg())  # another base of the same shape
    other.save_pretrained(tmp_path / "other.pt")
    with pytest.raises(AdapterError, match="trained on another base"):
        UniPerceiver.from_pretrained(tmp_path / "other.pt", adapter=tmp_path / "adapter.pt")
    with pytest.raises(AdapterError, match="not an adapter file"):
        UniPerceiver.from_pretrained(tmp_path / "base.pt", adapter=tmp_path / "other.pt")

    from uniperceiver.api import load_model

    api_model = load_model(tmp_path / "base.pt", adapter=tmp_path / "adapter.pt")
    assert torch.equal(api_model.predictor.fc_prompt.weight, tuned.predictor.fc_prompt.weight)
    with pytest.raises(AdapterError):
        load_model(tmp_path / "other.pt", adapter=tmp_path / "adapter.pt")


def test_eval_refuses_an_adapter_for_another_base_with_exit_2(tmp_path):
    torch.manual_seed(0)
    base = UniPerceiver(_base_cfg())
    save_adapter(_tuned(base), tmp_path / "adapter.pt")
    other = UniPerceiver(_base_cfg())
    other.save_pretrained(tmp_path / "other.pt")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"""_base_: {REPO / 'configs/zeroshot/demo.yaml'}
model: {{d_model: 32, num_layers: 2, num_heads: 4, d_ffn: 64, image_size: 32, layer_scale_init: 1.0}}
""")
    proc = subprocess.run([sys.executable, "-m", "uniperceiver.eval", str(cfg), f"eval.checkpoint={tmp_path / 'other.pt'}",
                           f"eval.adapter={tmp_path / 'adapter.pt'}", f"eval.output_json={tmp_path / 'e.json'}"],
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "another base model" in proc.stderr


def test_eval_of_a_prompt_config_without_adapter_says_how(tmp_path):
    from uniperceiver.config import RunConfig, load_config, to_dict
    from uniperceiver.modeling.checkpoint import CheckpointError, load_model

    torch.manual_seed(0)
    UniPerceiver(_base_cfg()).save_pretrained(tmp_path / "base.pt")
    model = to_dict(_base_cfg())
    model["prompt"] = {"enabled": True}
    cfg = load_config(RunConfig, data={"model": model})
    with pytest.raises(CheckpointError, match="eval.adapter"):
        load_model(tmp_path / "base.pt", cfg.model)
