"""The one model loader (`uniperceiver.modeling.checkpoint`): every format we read, the evaluation
settings decided in one place, strict errors that name the file."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from uniperceiver.config import ModelConfig, from_dict, to_dict
from uniperceiver.modeling.checkpoint import (CheckpointError, eval_model_config, eval_settings, load_model,
                                              load_weights, read_weights)
from uniperceiver.modeling.model import UniPerceiver

TINY = {"d_model": 32, "num_layers": 2, "num_heads": 2, "d_ffn": 64, "image_size": 32, "patch_size": 16,
        "drop_path": 0.1, "moe": {"enabled": True, "layers": "even",
                                  "routing": {"router": "token", "num_experts": 2, "top_k": 1}}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UniPerceiver(from_dict(ModelConfig, TINY))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        assert torch.equal(v, sb[k]), k


def test_every_format_loads_the_same_weights(model, tmp_path):
    model.save_pretrained(tmp_path / "model.pt")
    run_cfg = {"model": to_dict(model.cfg), "seed": 0}
    rng = {"numpy": np.random.get_state(), "python": (3, (1, 2), None)}  # as the trainer saves them
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "config": run_cfg,
                "optimizer": {}, "step": 7, "rng": [rng]}, tmp_path / "train.pt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    assert read_weights(tmp_path / "model.pt").format == "model_file"
    assert read_weights(tmp_path / "train.pt").format == "training_checkpoint"
    assert read_weights(tmp_path / "bare.pt").format == "state_dict"
    for name in ("model.pt", "train.pt"):
        loaded = load_model(tmp_path / name)
        _same(model, loaded)
        assert not loaded.training and loaded.cfg.moe.routing.dropless and loaded.cfg.drop_path == 0.0
    _same(model, load_model(tmp_path / "bare.pt", model.cfg))  # a bare state dict needs its config
    with pytest.raises(CheckpointError, match="bare.pt: records no model config"):
        load_model(tmp_path / "bare.pt")
    pretrained = UniPerceiver.from_pretrained(tmp_path / "model.pt", overrides=["drop_path=0.2"])
    assert pretrained.training and pretrained.cfg.drop_path == 0.2 and not pretrained.cfg.moe.routing.dropless
    _same(model, pretrained)
    fresh = UniPerceiver(model.cfg)
    load_weights(fresh, tmp_path / "train.pt")  # train.init_from
    _same(model, fresh)
    # a sharded directory goes through the reader the caller passes (engine.dcp's consolidation)
    (tmp_path / "step_00000007").mkdir()
    seen = []

    def read_sharded(path):
        seen.append(path)
        return model.state_dict(), run_cfg

    sharded = load_model(tmp_path / "step_00000007", read_sharded=read_sharded)
    assert seen == [tmp_path / "step_00000007"] and read_weights(seen[0], read_sharded=read_sharded).format == "sharded"
    _same(model, sharded)


def test_strict_errors_name_the_file(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt could not be read"):
        load_model(tmp_path / "junk.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"odd.pt: neither .* \(top-level keys: \['weights'\]\)"):
        read_weights(tmp_path / "odd.pt")
    (tmp_path / "sharded").mkdir()
    with pytest.raises(CheckpointError, match="sharded: a directory"):  # no reader given
        load_model(tmp_path / "sharded")
    model.save_pretrained(tmp_path / "model.pt")
    bigger = replace(model.cfg, d_model=64, num_heads=4)
    with pytest.raises(CheckpointError, match=r"(?s)model.pt: state dict does not match.*wrong shape.*"
                                              r"saved for \{'d_model': 32.*the config builds \{'d_model': 64"):
        load_model(tmp_path / "model.pt", bigger)


def test_eval_settings_are_one_decision(model):
    cfg = eval_model_config(model.cfg)
    assert cfg.moe.routing.dropless and cfg.drop_path == 0.0 and not model.cfg.moe.routing.dropless
    layers = [m for m in model.modules() if hasattr(m, "cfg") and type(m.cfg).__name__ == "MoEConfig"]
    assert layers and not any(m.cfg.dropless for m in layers)
    with eval_settings(model):
        assert all(m.cfg.dropless for m in layers)
    assert not any(m.cfg.dropless for m in layers)  # put back
