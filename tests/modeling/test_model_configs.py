"""Every model config builds; parameter counts match the release; config errors are clear."""
from pathlib import Path

import pytest
import torch

from uniperceiver.config import ConfigError, ModelConfig, RunConfig, load_config
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.tools.model_info import count_parameters, main as model_info_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
MODEL_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_model_config_builds_on_meta(path):
    cfg = load_config(RunConfig, str(path)).model
    with torch.device("meta"):
        model = UniPerceiver(cfg)
    total, active, _ = count_parameters(model)
    assert active <= total
    assert (active < total) == cfg.moe.enabled


@pytest.mark.parametrize("name,expected", [("base_dense", 124.76e6), ("base_moe", 422.7e6)])
def test_parameter_counts_match_the_release(name, expected):
    cfg = load_config(RunConfig, str(CONFIGS / f"{name}.yaml")).model
    with torch.device("meta"):
        total, _, _ = count_parameters(UniPerceiver(cfg))
    assert abs(total - expected) / expected < 1e-3, total


def test_model_info_last_line(capsys):
    assert model_info_main([str(CONFIGS / "tiny_moe.yaml")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    total, active = (int(part.split("=")[1]) for part in last.split())
    assert last.startswith("params_total=") and active < total


def test_unknown_model_key_suggests(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_base_: {CONFIGS / 'tiny_moe.yaml'}\nmodel:\n  num_layer: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.num_layer' \(from .*bad.yaml\); did you mean 'model.num_layers'"):
        load_config(RunConfig, str(bad))


def test_wrong_type_and_invalid_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"'model.moe.routing.top_k'.*expects int"):
        load_config(RunConfig, str(CONFIGS / "tiny_moe.yaml"), ["model.moe.routing.top_k=two"])
    with pytest.raises(ConfigError, match=r"d_model=64 is not divisible by num_heads=5"):
        load_config(RunConfig, str(CONFIGS / "tiny_moe.yaml"), ["model.num_heads=5"])
    with pytest.raises(ConfigError, match=r"top_k must be in \[1, num_experts=8\], got 9"):
        load_config(RunConfig, str(CONFIGS / "tiny_moe.yaml"), ["model.moe.routing.top_k=9"])


def test_tiny_config_equals_the_reference_shape():
    cfg = load_config(RunConfig, str(CONFIGS / "tiny_moe.yaml")).model
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_ffn, cfg.image_size) == (64, 4, 4, 256, 64)
    assert cfg.moe.enabled and cfg.moe.layer_indices(cfg.num_layers) == [0, 2]
    assert isinstance(cfg, ModelConfig)
