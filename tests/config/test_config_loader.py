"""Tests for the generic typed-config loader (uniperceiver/config/loader.py)."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import pytest

from uniperceiver.config import (
    ConfigError,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_config,
    load_yaml,
    parse_cli,
    to_dict,
)


@dataclass
class Encoder:
    dim: int = 8
    act: Literal["gelu", "relu"] = "gelu"


@dataclass
class Model:
    num_layers: int = 2
    hidden_dim: int = 16
    dropout: float = 0.1
    use_moe: bool = False
    name: str = "tiny"
    encoder: Encoder = field(default_factory=Encoder)
    experts: list[int] = field(default_factory=lambda: [1, 2])
    patch: tuple[int, int] = (4, 4)
    scales: tuple[float, ...] = (1.0,)
    extra: Optional[Encoder] = None


@dataclass
class Train:
    lr: float = 1e-3
    steps: int = 10
    tasks: dict[str, float] = field(default_factory=dict)
    tag: Optional[str] = None
    seed: Union[int, str] = 0
    meta: Any = None

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")


@dataclass
class Run:
    model: Model = field(default_factory=Model)
    train: Train = field(default_factory=Train)


@dataclass
class Required:
    output_dir: str
    epochs: int = 1


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


# ------------------------------------------------------------------ load_yaml / _base_


def test_base_two_levels_and_deep_merge(tmp_path):
    write(tmp_path, "base/root.yaml", """
        model: {num_layers: 2, hidden_dim: 16, experts: [1, 2, 3], encoder: {dim: 8, act: relu}}
        train: {lr: 0.1, tag: keep}
    """)
    write(tmp_path, "base/mid.yaml", """
        _base_: root.yaml
        model: {hidden_dim: 32, encoder: {dim: 4}}
    """)
    leaf = write(tmp_path, "exp/leaf.yaml", """
        _base_: ../base/mid.yaml
        model: {experts: [9]}
        train: {tag: null}
    """)
    prov: dict = {}
    data = load_yaml(leaf, provenance=prov)
    assert data == {
        "model": {"num_layers": 2, "hidden_dim": 32, "experts": [9], "encoder": {"dim": 4, "act": "relu"}},
        "train": {"lr": 0.1, "tag": None},
    }
    assert "_base_" not in data
    assert prov["model.num_layers"].endswith("root.yaml")
    assert prov["model.encoder.act"].endswith("root.yaml")
    assert prov["model.encoder.dim"].endswith("mid.yaml")
    assert prov["model.experts"].endswith("leaf.yaml")  # lists replaced, not merged
    assert prov["train.tag"].endswith("leaf.yaml")


def test_list_of_bases_later_wins(tmp_path):
    write(tmp_path, "a.yaml", "x: 1\ny: {p: 1, q: 1}\n")
    write(tmp_path, "b.yaml", "x: 2\ny: {q: 2}\nz: 3\n")
    child = write(tmp_path, "c.yaml", "_base_: [a.yaml, b.yaml]\nz: 4\n")
    assert load_yaml(child) == {"x": 2, "y": {"p": 1, "q": 2}, "z": 4}


def test_child_replaces_mapping_with_scalar_and_back(tmp_path):
    write(tmp_path, "a.yaml", "m: {x: 1}\nn: 5\n")
    child = write(tmp_path, "c.yaml", "_base_: a.yaml\nm: null\nn: {y: 2}\n")
    prov: dict = {}
    assert load_yaml(child, provenance=prov) == {"m": None, "n": {"y": 2}}
    assert "m.x" not in prov and prov["n.y"].endswith("c.yaml")


def test_include_cycle(tmp_path):
    write(tmp_path, "a.yaml", "_base_: b.yaml\n")
    write(tmp_path, "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"include cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_yaml(tmp_path / "a.yaml")


def test_missing_base_and_missing_file(tmp_path):
    child = write(tmp_path, "c.yaml", "_base_: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"base config 'nope.yaml' included from .*c\.yaml not found"):
        load_yaml(child)
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "absent.yaml")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = write(tmp_path, "bad.yaml", "a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_yaml(bad)
    msg = str(exc.value)
    assert "bad.yaml" in msg and "line 3" in msg


def test_duplicate_key_is_error(tmp_path):
    bad = write(tmp_path, "dup.yaml", "a: 1\nb: 2\na: 3\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml at line 3.*duplicate key 'a'"):
        load_yaml(bad)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping, got list"):
        load_yaml(write(tmp_path, "l.yaml", "- 1\n- 2\n"))
    assert load_yaml(write(tmp_path, "empty.yaml", "# nothing\n")) == {}


def test_exponent_floats_without_dot(tmp_path):
    assert load_yaml(write(tmp_path, "f.yaml", "lr: 1e-4\nwd: 5.0e2\n")) == {"lr": 1e-4, "wd": 500.0}


# ------------------------------------------------------------------ overrides


def test_override_value_types():
    out = apply_overrides(
        {"a": {"b": 1}},
        ["a.b=2", "a.f=0.5", "a.e=1e-5", "a.l=[1,2]", "a.n=null", "a.s=abc", "a.t=true", "x.y.z=3", "a.q="],
    )
    assert out == {"a": {"b": 2, "f": 0.5, "e": 1e-5, "l": [1, 2], "n": None, "s": "abc", "t": True, "q": None},
                   "x": {"y": {"z": 3}}}


def test_override_does_not_mutate_input():
    data = {"a": {"b": 1}}
    apply_overrides(data, ["a.b=2"])
    assert data == {"a": {"b": 1}}


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1", ".a=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match=f"malformed override '{bad}'"):
        apply_overrides({}, [bad])


def test_override_through_scalar_is_error():
    with pytest.raises(ConfigError, match=r"override 'a.b.c=1': 'a.b' is a int, not a mapping"):
        apply_overrides({"a": {"b": 3}}, ["a.b.c=1"])


# ------------------------------------------------------------------ from_dict errors


def test_unknown_key_with_suggestion_names_source_file(tmp_path):
    path = write(tmp_path, "configs/model/tiny.yaml", "model:\n  num_layer: 4\n")
    with pytest.raises(ConfigError) as exc:
        load_config(Run, path)
    msg = str(exc.value)
    assert f"unknown config key 'model.num_layer' (from {path}); did you mean 'model.num_layers'?" in msg
    assert "Valid keys under 'model': num_layers, hidden_dim, dropout," in msg


def test_unknown_key_without_suggestion_lists_valid_keys():
    with pytest.raises(ConfigError) as exc:
        from_dict(Run, {"zzz": 1}, source="run.yaml")
    assert str(exc.value) == "unknown config key 'zzz' (from run.yaml). Valid keys at top level: model, train"


def test_unknown_key_from_override_says_command_line(tmp_path):
    path = write(tmp_path, "run.yaml", "model: {num_layers: 3}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(Run, path, ["model.hiden_dim=4"])
    msg = str(exc.value)
    assert "unknown config key 'model.hiden_dim' (from command-line override 'model.hiden_dim=4')" in msg
    assert "did you mean 'model.hidden_dim'?" in msg
    with pytest.raises(ConfigError, match=r"'optim' \(from command-line override 'optim.lr=1'\)"):
        load_config(Run, path, ["optim.lr=1"])


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"model": {"num_layers": "four"}}, "config key 'model.num_layers' (from run.yaml) expects int, got str 'four'"),
        ({"model": {"num_layers": 2.5}}, "config key 'model.num_layers' (from run.yaml) expects int, got float 2.5"),
        ({"model": {"num_layers": True}}, "config key 'model.num_layers' (from run.yaml) expects int, got bool True"),
        ({"train": {"lr": "abc"}}, "config key 'train.lr' (from run.yaml) expects float, got str 'abc'"),
        ({"train": {"lr": False}}, "config key 'train.lr' (from run.yaml) expects float, got bool False"),
        ({"model": {"use_moe": 1}}, "config key 'model.use_moe' (from run.yaml) expects bool, got int 1"),
        ({"model": {"name": 3}}, "config key 'model.name' (from run.yaml) expects str, got int 3"),
        ({"model": {"experts": 3}}, "config key 'model.experts' (from run.yaml) expects list[int], got int 3"),
        ({"model": {"experts": [1, "x"]}},
         "config key 'model.experts[1]' (from run.yaml) expects int, got str 'x'"),
        ({"model": {"patch": [1, 2, 3]}},
         "config key 'model.patch' (from run.yaml) expects tuple[int, int] (2 items), got list [1, 2, 3]"),
        ({"model": {"scales": [1, "a"]}}, "config key 'model.scales[1]' (from run.yaml) expects float, got str 'a'"),
        ({"model": {"encoder": {"act": "tanh"}}},
         "config key 'model.encoder.act' (from run.yaml) expects one of 'gelu', 'relu', got str 'tanh'"),
        ({"model": {"encoder": [1]}},
         "config 'model.encoder' (from run.yaml) expects a mapping for Encoder, got list [1]"),
        ({"model": {"extra": {"dim": "x"}}},
         "config key 'model.extra.dim' (from run.yaml) expects int, got str 'x'"),
        ({"train": {"tasks": {"cls": "x"}}},
         "config key 'train.tasks.cls' (from run.yaml) expects float, got str 'x'"),
        ({"train": {"tag": 5}}, "config key 'train.tag' (from run.yaml) expects str | None, got int 5"),
        ({"train": {"seed": 1.5}}, "config key 'train.seed' (from run.yaml) expects int | str, got float 1.5"),
    ],
)
def test_wrong_types(data, expected):
    with pytest.raises(ConfigError) as exc:
        from_dict(Run, data, source="run.yaml")
    assert str(exc.value) == expected


def test_type_error_cites_the_file_that_set_the_value(tmp_path):
    write(tmp_path, "base.yaml", "train: {lr: oops, steps: 5}\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\ntrain: {steps: 6}\n")
    with pytest.raises(ConfigError, match=r"'train.lr' \(from .*base\.yaml\) expects float"):
        load_config(Run, child)
    with pytest.raises(ConfigError, match=r"'train.steps' \(from command-line override 'train.steps=x'\)"):
        load_config(Run, child, ["train.lr=0.5", "train.steps=x"])


def test_missing_required_field():
    with pytest.raises(ConfigError, match=r"^missing required config key 'output_dir' \(from r.yaml\)$"):
        from_dict(Required, {"epochs": 2}, source="r.yaml")
    with pytest.raises(ConfigError, match=r"missing required config key 'job.output_dir'"):
        from_dict(Required, {}, path="job")


def test_post_init_error_reraised_with_path(tmp_path):
    path = write(tmp_path, "run.yaml", "train: {steps: 0}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(Run, path)
    assert str(exc.value) == f"invalid config 'train' (from {path}): steps must be positive, got 0"
    assert isinstance(exc.value.__cause__, ValueError)


# ------------------------------------------------------------------ conversion + round trip


def test_conversions():
    cfg = from_dict(Run, {
        "model": {"dropout": 0, "patch": [8, 8], "scales": [1, 2.5], "extra": {"dim": 3}},
        "train": {"tasks": {"a": 1}, "seed": "auto", "meta": {"anything": [1]}},
    })
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    assert cfg.model.patch == (8, 8) and cfg.model.scales == (1.0, 2.5)
    assert cfg.model.extra == Encoder(dim=3)
    assert cfg.train.tasks == {"a": 1.0} and cfg.train.seed == "auto"
    assert cfg.train.meta == {"anything": [1]}
    assert cfg.model.encoder == Encoder()  # defaults filled


def test_round_trip_to_dict_from_dict():
    cfg = Run(
        model=Model(num_layers=4, experts=[3], patch=(2, 3), scales=(0.5, 1.0), extra=Encoder(5, "relu")),
        train=Train(lr=3e-4, tasks={"cls": 0.5}, tag="t", seed="s"),
    )
    plain = to_dict(cfg)
    assert plain["model"]["patch"] == [2, 3] and plain["model"]["extra"] == {"dim": 5, "act": "relu"}
    assert from_dict(Run, plain) == cfg


def test_round_trip_dump_yaml_load_config(tmp_path):
    cfg = load_config(Run, overrides=["model.num_layers=6", "train.lr=2e-4", "model.patch=[16,16]"])
    out = tmp_path / "runs" / "exp" / "config.yaml"
    dump_yaml(cfg, out)
    assert out.read_text().startswith("model:\n  num_layers: 6\n")
    assert load_config(Run, out) == cfg
    assert load_config(Run, str(out), ["train.steps=7"]) == dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, steps=7))


def test_load_config_from_data():
    cfg = load_config(Run, data={"model": {"num_layers": 3}}, overrides=["train.tag=x"])
    assert cfg.model.num_layers == 3 and cfg.train.tag == "x"
    with pytest.raises(ConfigError, match="either"):
        load_config(Run, "x.yaml", data={})


# ------------------------------------------------------------------ parse_cli


def test_parse_cli(tmp_path):
    assert parse_cli(["cfg.yaml", "a.b=1", "c=[1, 2]"]) == ("cfg.yaml", ["a.b=1", "c=[1, 2]"])
    assert parse_cli(["cfg.yaml"]) == ("cfg.yaml", [])
    with pytest.raises(ConfigError, match="first argument must be a config file path"):
        parse_cli([])
    with pytest.raises(ConfigError, match="first argument must be a config file path"):
        parse_cli(["a.b=1"])
    with pytest.raises(ConfigError, match="unexpected argument 'other.yaml'"):
        parse_cli(["cfg.yaml", "other.yaml"])
    with pytest.raises(ConfigError, match="unexpected argument '--lr=1'"):
        parse_cli(["cfg.yaml", "--lr=1"])
    odd = tmp_path / "lr=0.1.yaml"  # a real file whose name contains '=' is still a path
    odd.write_text("{}\n")
    assert parse_cli([os.fspath(odd)]) == (os.fspath(odd), [])
