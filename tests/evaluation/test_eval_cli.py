"""`python -m uniperceiver.eval`: exit codes (0 ok, 1 pinned metric missed, 2 bad input), the JSON
with config and checkpoint, and errors that name the file and what was expected (checkpoint of
another size, class-name file of the wrong length, missing checkpoint)."""
import json
from dataclasses import replace

import pytest
import torch

import eval_fakes as F
from uniperceiver import eval as eval_cli
from uniperceiver.config import dump_yaml, to_dict
from uniperceiver.evaluation import EvalInputError, evaluate
from uniperceiver.modeling.checkpoint import load_model
from uniperceiver.modeling.model import UniPerceiver


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model file and a config (classification only) that evaluates it."""
    folder = tmp_path_factory.mktemp("cli")
    model = F.tiny_model(seed=2)
    ckpt = folder / "tiny.pt"
    model.save_pretrained(ckpt)
    cfg = F.run_config(model.cfg, extra=["eval.tasks=[cls]"])
    path = folder / "eval.yaml"
    dump_yaml(cfg, path)
    return model, ckpt, path


def test_cli_writes_json_and_exit_codes(saved, fake_data, tmp_path, capsys):
    model, ckpt, cfg_path = saved
    out = tmp_path / "out" / "eval.json"
    rc = eval_cli.main([str(cfg_path), f"eval.checkpoint={ckpt}", f"eval.output_json={out}"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "top1" in printed and f"wrote {out}" in printed
    blob = json.loads(out.read_text())
    top1 = blob["metrics"]["cls"]["top1"]
    assert blob["checkpoint"]["path"] == str(ckpt.resolve())
    assert len(blob["checkpoint"]["sha256"]) == 64
    assert blob["config"]["eval"]["checkpoint"] == str(ckpt)

    rc = eval_cli.main([str(cfg_path), f"eval.checkpoint={ckpt}", f"eval.output_json={out}",
                        f"eval.expected={{cls/top1: {top1 + 5}}}", "eval.tolerance=1.0"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "MISS cls/top1" in captured.err and "MISS" in captured.out
    assert json.loads(out.read_text())["passed"] is False


def test_checkpoint_of_another_size(saved, tmp_path, capsys):
    _, _, cfg_path = saved
    other = UniPerceiver(replace(F.tiny_model_config(), d_model=32, num_heads=4))
    path = tmp_path / "small.pt"
    other.save_pretrained(path)
    rc = eval_cli.main([str(cfg_path), f"eval.checkpoint={path}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(path) in err and "wrong shape" in err
    assert "embed.word.weight: checkpoint (49411, 32) vs model (49411, 64)" in err
    assert "saved for {'d_model': 32" in err and "the config builds {'d_model': 64" in err


def test_missing_or_unset_checkpoint(saved, tmp_path, capsys):
    _, _, cfg_path = saved
    assert eval_cli.main([str(cfg_path), f"eval.checkpoint={tmp_path / 'nope.pt'}"]) == 2
    assert f"checkpoint {tmp_path / 'nope.pt'} does not exist" in capsys.readouterr().err
    assert eval_cli.main([str(cfg_path)]) == 2
    assert "set eval.checkpoint=PATH" in capsys.readouterr().err
    assert eval_cli.main([str(cfg_path), "eval.tolerence=1"]) == 2
    assert "did you mean 'eval.tolerance'" in capsys.readouterr().err


def test_training_checkpoint_is_accepted(saved, tmp_path):
    model, _, _ = saved
    cfg = F.run_config(model.cfg)
    path = tmp_path / "step_100.pt"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # saved from DDP
    torch.save({"model": state, "config": to_dict(cfg), "step": 100, "optimizer": {}}, path)
    loaded = load_model(path, cfg.model)
    assert loaded.cfg.moe.routing.dropless and loaded.cfg.drop_path == 0.0 and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_class_name_file_of_wrong_length(saved, fake_data, tmp_path):
    model, _, _ = saved
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"class {i}" for i in range(9)) + "\n")
    cfg = F.run_config(model.cfg, extra=["eval.tasks=[cls]"])
    cfg.target_sets["classes"] = replace(cfg.target_sets["classes"], names=None, file=str(names))
    cfg.task("cls").eval_data.options["num_classes"] = 10
    with pytest.raises(EvalInputError, match=rf"\({names}\) has 9 entries, but the dataset has 10 classes"):
        evaluate(cfg, model=model, progress=False)

    # a dataset that does not know its class count: the first label past the end fails
    del cfg.task("cls").eval_data.options["num_classes"]
    with pytest.raises(EvalInputError, match=rf"sample 's9' has label 9, but .*\({names}\) has only 9 "
                                             r"entries; expected at least 10"):
        evaluate(cfg, model=model, progress=False)


def test_class_names_checked_against_the_dataset(saved, fake_data):
    """Kinetics datasets know their class names (category_mapping.txt): the same names in
    another order stop the run; a differently worded name is only noted."""
    model, _, _ = saved
    cfg = F.run_config(model.cfg, extra=["eval.tasks=[cls]"])
    names = cfg.target_sets["classes"].names
    cfg.task("cls").eval_data.options["class_names"] = list(reversed(names))
    with pytest.raises(EvalInputError, match=r"of category_mapping.txt in another order \(class 0 is 'car thing' "
                                             r"in category_mapping.txt but 'red thing'"):
        evaluate(cfg, model=model, progress=False)
    cfg.task("cls").eval_data.options["class_names"] = [n.replace(" ", "_") for n in names[:9]] + ["kayak"]
    report = evaluate(cfg, model=model, progress=False)
    assert report.notes["cls"] == ["1 class names differ from the dataset's (class 9 is 'kayak' in "
                                   "category_mapping.txt but 'car thing' in target_sets.classes.names)"]


def test_missing_image_names_the_file(saved, tmp_path, capsys):
    """Through the real data layer (a JSONL manifest): the error names the image and the line."""
    from PIL import Image

    model, ckpt, _ = saved
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "img" / "0.png")
    manifest = tmp_path / "val.jsonl"
    manifest.write_text(json.dumps({"image": "img/0.png", "label": 0}) + "\n"
                        + json.dumps({"image": "img/1.png", "label": 1}) + "\n")
    cfg = tmp_path / "missing.yaml"
    model_yaml = json.dumps(to_dict(model.cfg))
    cfg.write_text(f"""model: {model_yaml}
target_sets: {{colours: {{kind: class_names, names: [red, green]}}}}
tasks:
  - {{name: cls, type: image_classification, target_set: colours,
     eval_data: {{format: jsonl, root: {tmp_path}, annotations: {manifest}, split: val}}}}
""")
    rc = eval_cli.main([str(cfg), f"eval.checkpoint={ckpt}", f"eval.output_json={tmp_path / 'out.json'}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(tmp_path / "img" / "1.png") in err and f"{manifest}:2" in err
