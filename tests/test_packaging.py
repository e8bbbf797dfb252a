"""Packaging: the configs and the demo data ship in the wheel, packaged configs are found by short
name, the subpackages import each other without cycles, and $DATA_PATH means the same in training
and evaluation."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from uniperceiver.config import ConfigError, RunConfig, load_config, parse_cli
from uniperceiver.utils.resources import config_dir, demo_data_dir, find_config

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "uniperceiver"
SOURCE_CONFIGS = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml"))


# ----------------------------------------------------------------------------- config lookup
@pytest.mark.parametrize("name", ["zeroshot/imagenet1k", "zeroshot/imagenet1k.yaml",
                                  "configs/zeroshot/imagenet1k.yaml"])
def test_packaged_config_by_short_name_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = find_config(name)
    assert Path(path) == config_dir() / "zeroshot" / "imagenet1k.yaml"
    cfg = load_config(RunConfig, name)  # its `_base_` chain (zeroshot -> base_moe -> ...) resolves too
    assert cfg.model.d_model == 768 and cfg.model.moe.enabled and cfg.model.drop_path == 0.0
    assert len(cfg.target_sets["imagenet1k"].names) == 1000
    assert parse_cli([name, "eval.checkpoint=x.pt"]) == (name, ["eval.checkpoint=x.pt"])


def test_a_file_in_the_working_directory_wins_and_unknown_names_fail(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zeroshot").mkdir()
    (tmp_path / "zeroshot" / "imagenet1k.yaml").write_text("seed: 7\n")
    assert load_config(RunConfig, "zeroshot/imagenet1k.yaml").seed == 7
    with pytest.raises(ConfigError, match=r"config file not found: zeroshot/nope.*packaged config"):
        load_config(RunConfig, "zeroshot/nope")


def test_configs_link_is_the_top_level_folder():
    assert config_dir().resolve() == (REPO / "configs").resolve()
    assert sorted(p.relative_to(config_dir()).as_posix() for p in config_dir().rglob("*.yaml")) == SOURCE_CONFIGS
    assert (demo_data_dir() / "manifest.json").is_file()


# ----------------------------------------------------------------------------- the wheel
def _build_wheel(tmp_path: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the source tree (the checkout itself stays clean)."""
    src = tmp_path / "src"
    junk = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("uniperceiver", "moe", "configs"):  # what the wheel is made of
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=junk)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    out = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_wheel_ships_configs_and_demo_data_and_finds_them(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    packaged = sorted(n[len("uniperceiver/configs/"):] for n in names if n.startswith("uniperceiver/configs/"))
    assert packaged == SOURCE_CONFIGS  # every config, as files (the link is materialised)
    manifest = json.loads((demo_data_dir() / "manifest.json").read_text())
    for name in [*manifest["files"], "manifest.json"]:
        assert f"uniperceiver/demo/data/{name}" in names, name
    assert "uniperceiver/demo/__main__.py" in names and "uniperceiver/data/demo_files.py" in names
    assert not [n for n in names if "maintainer" in n]  # the demo-data builder is not runtime code

    # The extracted wheel alone (no source tree on the path) finds its configs by short name.
    code = ("from uniperceiver.config import RunConfig, load_config; "
            "from uniperceiver.utils.resources import find_config; "
            "print(find_config('zeroshot/imagenet1k')); "
            "cfg = load_config(RunConfig, 'debug/tiny_cpu'); print(cfg.model.d_model)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-c", code], cwd=empty, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found, d_model = proc.stdout.split()
    assert Path(found) == tmp_path / "site" / "uniperceiver" / "configs" / "zeroshot" / "imagenet1k.yaml"
    assert d_model == "64"


# ----------------------------------------------------------------------------- import graph
def _imports(file: Path) -> set[str]:
    """Every module `file` imports, absolute, counting imports inside functions too: a lazy
    import is still a dependency."""
    package = ["uniperceiver", *file.relative_to(PACKAGE).parts[:-1]]  # where relative imports start
    targets: set[str] = set()
    for stmt in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(stmt, ast.ImportFrom):
            base = package[: len(package) - stmt.level + 1] if stmt.level else []
            name = ".".join([*base, stmt.module] if stmt.module else base)
            targets |= {f"{name}.{a.name}" for a in stmt.names} if name == "uniperceiver" else {name}
        elif isinstance(stmt, ast.Import):
            targets |= {a.name for a in stmt.names}
    return targets


def _runtime_files() -> list[Path]:
    return [f for f in PACKAGE.rglob("*.py") if "maintainer" not in f.relative_to(PACKAGE).parts]


def _subpackage_imports() -> dict[str, set[str]]:
    """Static import graph between the top-level parts of `uniperceiver` (a subpackage or a module)."""
    graph: dict[str, set[str]] = {}
    for file in _runtime_files():
        node = file.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for target in _imports(file):
            parts = target.split(".")
            if parts[0] == "uniperceiver" and len(parts) > 1 and parts[1] != node:
                graph.setdefault(node, set()).add(parts[1])
    return graph


def test_no_import_cycles_between_subpackages():
    graph = _subpackage_imports()
    assert graph["demo"] >= {"data", "engine"}  # the graph is read at all
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    # Layering: configs and the data layer never reach up into the commands built on them.
    assert not graph.get("config", set()) - {"utils"}
    assert "demo" not in graph.get("data", set())


def test_runtime_code_never_imports_the_maintainer_scripts():
    maintainer = PACKAGE / "tools" / "maintainer" / "prepare_demo_data.py"
    assert "uniperceiver.data.demo_files" in _imports(maintainer)  # the graph sees its imports
    for file in _runtime_files():
        assert not [m for m in _imports(file) if "maintainer" in m], file


# ----------------------------------------------------------------------------- $DATA_PATH
def _data_run(tmp_path: Path, root: str) -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""_base_: {REPO / 'configs/model/tiny_dense.yaml'}
model: {{image_size: 32}}
target_sets:
  colours: {{kind: class_names, names: [red, green]}}
tasks:
  - name: cls
    type: image_classification
    target_set: colours
    train_data: {{format: jsonl, root: "{root}", annotations: "{root}train.jsonl"}}
    eval_data: {{format: jsonl, root: "{root}", annotations: "{root}train.jsonl"}}
    batch_size: 2
train: {{output_dir: {tmp_path / 'out'}, max_steps: 1, tensorboard: false, device: cpu}}
eval: {{checkpoint: {tmp_path / 'missing.pt'}}}
""")
    return cfg


def test_unset_data_path_exits_2_naming_it_in_training_and_evaluation(tmp_path, monkeypatch, capsys):
    from uniperceiver.eval import main as eval_main
    from uniperceiver.train import main as train_main

    monkeypatch.delenv("DATA_PATH", raising=False)
    cfg = _data_run(tmp_path, "$DATA_PATH/")
    assert train_main([str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "$DATA_PATH" in err and "tasks[0].train_data.root" in err
    assert eval_main([str(cfg)]) == 2  # before the (missing) checkpoint is opened
    err = capsys.readouterr().err
    assert "$DATA_PATH" in err and "tasks[0].eval_data.root" in err and "missing.pt" not in err
    assert eval_main(["zeroshot/imagenet1k", f"eval.checkpoint={tmp_path / 'missing.pt'}"]) == 2
    assert "$DATA_PATH" in capsys.readouterr().err


def test_relative_data_paths_fall_back_to_data_path_in_training_and_evaluation(tmp_path, monkeypatch):
    from PIL import Image

    from uniperceiver.engine import Trainer

    data = tmp_path / "datasets"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (200 * (i % 2), 0, 0)).save(data / f"{i}.png")
    (data / "train.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "label": i % 2}) + "\n"
                                              for i in range(4)))
    monkeypatch.setenv("DATA_PATH", str(data))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(RunConfig, _data_run(tmp_path, ""))
    assert cfg.resolved_data_root() == str(data)
    trainer = Trainer(cfg)
    assert trainer.data_root == str(data) and len(trainer.tasks[0].dataset) == 4
    assert load_config(RunConfig, _data_run(tmp_path, ""), [f"data_root={tmp_path}"]).resolved_data_root() == \
        str(tmp_path)
