"""One exit-code convention for every command: bad input (config, checkpoint, data) exits 2 with
one line naming the file/key; --help prints usage and config keys; --debug adds the traceback;
a full disk says so."""
import errno
import json

import pytest
import torch

from engine_utils import write_tiny_run

from uniperceiver import cli
from uniperceiver import eval as eval_cli
from uniperceiver import train as train_cli
from uniperceiver.config import RunConfig, load_config
from uniperceiver.convert.__main__ import main as convert_main
from uniperceiver.demo.__main__ import main as demo_main
from uniperceiver.modeling.model import UniPerceiver


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cfg = write_tiny_run(tmp)
    model_cfg = load_config(RunConfig, str(cfg)).model
    torch.manual_seed(0)
    good = tmp / "model.pt"
    UniPerceiver(model_cfg).save_pretrained(good)
    corrupt = tmp / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[:1000])
    eval_data = f"tasks.cls.eval_data={{format: jsonl, root: {tmp}, annotations: {tmp / 'train.jsonl'}, split: val}}"
    return tmp, cfg, good, corrupt, eval_data


def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in err[0], (needle, err[0])
    return err[0]


def test_train_exit_codes(setup, capsys, tmp_path):
    tmp, cfg, good, corrupt, _ = setup
    out = f"train.output_dir={tmp_path / 'out'}"
    assert train_cli.main([str(cfg), out, "train.max_step=2"]) == 2
    _one_line(capsys, "train.max_step", "train.max_steps")
    assert train_cli.main([str(cfg), out, f"train.init_from={corrupt}"]) == 2
    _one_line(capsys, corrupt, "truncated or corrupt")
    missing = tmp / "nope.jsonl"
    assert train_cli.main([str(cfg), out, f"tasks.cls.train_data.annotations={missing}"]) == 2
    _one_line(capsys, missing)
    assert train_cli.main([str(cfg), out, "train.output_dir=$NO_SUCH_VARIABLE_I12/x"]) == 2
    _one_line(capsys, "$NO_SUCH_VARIABLE_I12", "which is not set")


def test_eval_exit_codes(setup, capsys):
    tmp, cfg, good, corrupt, eval_data = setup
    assert eval_cli.main([str(cfg), eval_data, f"eval.checkpoint={good}", "eval.tolerence=1"]) == 2
    _one_line(capsys, "eval.tolerance")
    assert eval_cli.main([str(cfg), eval_data, f"eval.checkpoint={corrupt}"]) == 2
    _one_line(capsys, corrupt, "truncated or corrupt")
    missing = tmp / "nope.jsonl"
    bad_data = eval_data.replace(str(tmp / "train.jsonl"), str(missing))
    assert eval_cli.main([str(cfg), bad_data, f"eval.checkpoint={good}"]) == 2
    _one_line(capsys, missing)
    assert eval_cli.main([str(cfg), eval_data, f"eval.checkpoint={good}", "eval.tasks=[nosuchtask]"]) == 2
    _one_line(capsys, "nosuchtask", "not a task of")


def test_eval_pins_from_the_command_line_replace_that_tasks_pins_and_are_checked_first(setup, capsys, tmp_path):
    tmp, cfg, good, _, eval_data = setup
    base = [str(cfg), eval_data, f"eval.checkpoint={good}", "eval.tasks=[cls]", f"eval.output_json={tmp_path / 'e.json'}"]
    # an invalid pin key fails before anything is evaluated (no JSON written)
    assert eval_cli.main([*base, "eval.expected.cls/top7x=1"]) == 2
    _one_line(capsys, "eval.expected key 'cls/top7x'", "reports no 'top7x'")
    assert eval_cli.main([*base, "eval.expected.ret/top1=1"]) == 2
    _one_line(capsys, "'ret' is not an evaluated task")
    assert not (tmp_path / "e.json").exists()
    # the shipped pins of the task are replaced, not merged: cls/top5=100 goes, cls/top1=0 stays alone
    rc = eval_cli.main([*base, "eval.expected={cls/top5: 100.0}", "eval.expected.cls/top1=0", "eval.tolerance=100"])
    assert rc == 0, capsys.readouterr()
    assert json.loads((tmp_path / "e.json").read_text())["config"]["eval"]["expected"] == {"cls/top1": 0.0}


def test_eval_refuses_a_config_that_describes_another_model(setup, capsys, caplog):
    tmp, cfg, good, _, eval_data = setup
    # image_size 32 -> 64: same parameter shapes (the sin-cos table is recomputed), another model
    other = tmp / "other.yaml"
    other.write_text(cfg.read_text().replace("image_size: 32", "image_size: 64"))
    assert eval_cli.main([str(other), eval_data, f"eval.checkpoint={good}", "eval.tasks=[cls]"]) == 2
    _one_line(capsys, "model.image_size=64", "trained with 32", good)
    # on the command line it is deliberate: a warning, and the run goes ahead
    rc = eval_cli.main([str(cfg), eval_data, f"eval.checkpoint={good}", "eval.tasks=[cls]", "model.image_size=64",
                        f"eval.output_json={tmp / 'deliberate.json'}"])
    assert rc == 0
    assert "model.image_size=64 set on the command line" in caplog.text
    assert json.loads((tmp / "deliberate.json").read_text())["config"]["model"]["image_size"] == 64


def test_convert_and_demo_exit_codes(setup, capsys, tmp_path):
    tmp, cfg, good, corrupt, _ = setup
    assert convert_main(["--from", "official", str(corrupt), str(tmp_path / "o.pt")]) == 2
    _one_line(capsys, corrupt)
    assert convert_main(["--from", "official", str(tmp / "nope.pth"), str(tmp_path / "o.pt")]) == 2
    _one_line(capsys, tmp / "nope.pth")
    with pytest.raises(SystemExit) as exc:  # argparse's own usage errors are exit 2 too
        convert_main(["--from", "nosuchformat", "a", "b"])
    assert exc.value.code == 2
    assert "invalid choice: 'nosuchformat'" in capsys.readouterr().err
    out = f"train.output_dir={tmp_path / 'demo'}"
    assert demo_main([out, "train.max_step=2"]) == 2
    _one_line(capsys, "train.max_step")
    assert demo_main([out, f"train.init_from={corrupt}"]) == 2
    _one_line(capsys, corrupt)
    assert demo_main([out, "tasks.fashion_mnist.train_data.root=/nonexistent_i12"]) == 2
    _one_line(capsys, "/nonexistent_i12")


def test_help_debug_and_disk_full(setup, capsys, monkeypatch, tmp_path):
    tmp, cfg, *_ = setup
    for main in (train_cli.main, eval_cli.main, demo_main):
        assert main(["--help"]) == 0
        text = capsys.readouterr().out
        assert "usage" in text.lower() or "python -m" in text
        assert "train.max_steps: int = 1000" in text or "eval.tolerance: float = 0.01" in text
    assert train_cli.main(["--help"]) == 0
    assert "tasks.<name>.<key>=value" in capsys.readouterr().out

    assert train_cli.main([str(cfg), "train.max_step=2", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    assert train_cli.main([str(cfg), f"train.output_dir={tmp_path / 'full'}", "train.max_steps=1"]) == 3
    _one_line(capsys, "no space left on device", tmp_path / "full" / "checkpoints" / "step_00000001.pt")
    assert not list((tmp_path / "full" / "checkpoints").iterdir())  # no temporary left behind
    assert cli.EXIT_BAD_INPUT == 2


def test_missing_java_is_bad_input(monkeypatch, capsys):
    import importlib

    caption_metrics = importlib.import_module("uniperceiver.evaluation.caption_metrics")  # the module, not the function
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)

    def needs_java(args):
        caption_metrics.check_caption_tools()
        return 0

    assert cli.run(needs_java, []) == 2
    _one_line(capsys, "caption metrics need")
