"""The task registry: every built-in type is a TaskSpec, and a new task type is one spec that
trains and evaluates through the normal commands (`uniperceiver.train`, `uniperceiver.eval`).

The toy type: image regression onto a class-name set. Each image shows a number of bright bars;
the model reads its value as the expectation of the names' values ("zero", "one", ...) under the
softmax of its similarities to them, trained with a squared error, scored by the mean absolute
error. Nothing outside this file knows it exists."""
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from uniperceiver import eval as eval_cli, train as train_cli
from uniperceiver.config import ConfigError, RunConfig, load_config
from uniperceiver.evaluation.evaluators import Evaluator, TaskResult
from uniperceiver.modeling.attributes import VISUAL_INPUT, task_attributes
from uniperceiver.tasks import TaskOutput, TaskSpec, registered, run_task, task_spec, task_types

REPO = Path(__file__).resolve().parents[2]
VALUES = ["zero", "one", "two", "three"]


def collate(c: Any, samples: list[dict]) -> Any:
    seg = c.single_view(samples)
    values = torch.tensor(c.need(samples, "label"), dtype=torch.float32)
    return c.batch(samples, c.seq([seg]), labels=values, target_set=c.task.target_set)


def predict(model, batch, names_ND):
    enc = model.encode(batch.inputs)
    probs_BN = model.logits(model.features(enc.hidden_BLD[:, 0]), names_ND, batch.temperature).float().softmax(-1)
    return probs_BN @ torch.arange(names_ND.shape[0], dtype=torch.float32, device=probs_BN.device), enc


def forward(model, batch, names_ND, temporal_offsets=None) -> TaskOutput:
    value_B, enc = predict(model, batch, names_ND)
    target_B = batch.labels.to(value_B.device)
    out = TaskOutput(logits=value_B[:, None], decisions=enc.decisions)
    out.losses["mse"] = batch.loss_weight * ((value_B - target_B) ** 2).mean()
    out.metrics["mae"] = (value_B - target_B).abs().mean().detach()
    return out


class RegressionEvaluator(Evaluator):
    @torch.no_grad()
    def process(self, indices, infos, batch):
        value_B, _ = predict(self.model, batch, self.target_features())
        return [(i, float(abs(v - t))) for i, v, t in zip(indices, value_B.cpu(), batch.labels)]

    def summarize(self, records):
        return TaskResult({"mae": sum(records) / len(records)}, notes=[f"{len(records)} images"])


TOY = TaskSpec("image_regression", "regression", "image", {"input": (VISUAL_INPUT,)}, "img_cls",
               formats=("jsonl",), collate=collate, forward=forward, evaluator=RegressionEvaluator,
               target_sets=("class_names",))


def _write_run(tmp: Path) -> Path:
    (tmp / "img").mkdir()
    with open(tmp / "data.jsonl", "w") as f:
        for i in range(8):
            value = i % len(VALUES)
            pixels = torch.zeros(32, 32, 3, dtype=torch.uint8)
            for bar in range(value):
                pixels[:, 4 + 8 * bar: 8 + 8 * bar] = 255
            Image.fromarray(pixels.numpy()).save(tmp / "img" / f"{i}.png")
            f.write(json.dumps({"image": f"img/{i}.png", "label": value}) + "\n")
    data = f"{{format: jsonl, root: {tmp}, annotations: {tmp / 'data.jsonl'}}}"
    cfg = tmp / "run.yaml"
    cfg.write_text(f"""_base_: {REPO / 'configs/model/tiny_moe.yaml'}
model: {{image_size: 32, layer_scale_init: 0.1, num_layers: 2}}
target_sets:
  values: {{kind: class_names, names: {json.dumps(VALUES)}}}
tasks:
  - {{name: bars, type: image_regression, target_set: values, batch_size: 4, eval_batch_size: 5,
     train_data: {data}, eval_data: {data}}}
train:
  output_dir: {tmp / 'out'}
  max_steps: 3
  checkpoint_every: 3
  tensorboard: false
  device: cpu
  optim: {{lr: 1.0e-3, warmup_steps: 1}}
eval: {{output_json: {tmp / 'eval.json'}}}
""")
    return cfg


def test_builtin_types_are_specs():
    assert set(task_types()) >= {"image_classification", "video_classification", "text_classification",
                                 "image_retrieval", "video_retrieval", "image_caption", "video_caption",
                                 "text_mlm"}
    assert task_spec("image_caption").kind == task_spec("video_caption").kind == "caption"
    assert task_attributes("image_caption").shape == (2, 8)  # visual row + caption-text row
    with pytest.raises(ValueError, match="did you mean 'image_classification'"):
        task_spec("image_clasification")


def test_a_new_task_type_trains_and_evaluates_through_the_normal_commands(tmp_path):
    cfg_path = _write_run(tmp_path)
    with pytest.raises(ConfigError, match="unknown task type 'image_regression'"):
        load_config(RunConfig, str(cfg_path))  # not registered: the config names the known types
    with registered(TOY):
        cfg = load_config(RunConfig, str(cfg_path))
        assert cfg.task("bars").temperature == "img_cls"  # the spec's default
        assert train_cli.main([str(cfg_path)]) == 0
        checkpoint = sorted((tmp_path / "out").rglob("*.pt"))[-1]
        assert eval_cli.main([str(cfg_path), f"eval.checkpoint={checkpoint}"]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    mae = report["metrics"]["bars"]["mae"]
    assert 0.0 <= mae <= 3.0
    assert "image_regression" not in task_types()  # gone after the block


def test_run_task_dispatches_on_the_spec(tmp_path):
    """The trainer's forward (run_task) reaches the toy spec's forward, loss weight applied."""
    from uniperceiver.data import make_collate
    from uniperceiver.modeling.model import UniPerceiver
    from uniperceiver.tokenization import ClipTokenizer

    cfg_path = _write_run(tmp_path)
    with registered(TOY):
        cfg = load_config(RunConfig, str(cfg_path))
        task = cfg.task("bars")
        task.loss_weight = 2.0
        collate = make_collate(task, ClipTokenizer(), training=True)
        samples = [{"image": torch.randn(3, 32, 32), "label": v, "id": v} for v in range(4)]
        batch = collate(samples)
        assert batch.kind == "regression" and batch.labels.dtype == torch.float32
        torch.manual_seed(0)
        model = UniPerceiver(cfg.model).eval()
        names = torch.nn.functional.normalize(torch.randn(4, cfg.model.d_model), dim=-1)
        out = run_task(model, batch, {"values": names})
        with torch.no_grad():
            value, _ = predict(model, batch, names)
        assert torch.allclose(out.losses["mse"], 2.0 * ((value - batch.labels) ** 2).mean())
        with pytest.raises(KeyError, match="target set 'values'"):
            run_task(model, batch, {})
