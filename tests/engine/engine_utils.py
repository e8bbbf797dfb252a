"""A tiny real training setup for the engine tests: coloured-square images in a JSONL manifest,
two tasks (a helper module with a unique name, so it never collides with other conftest.py files)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[2]
COLOURS = {"red square": (230, 20, 20), "green square": (20, 200, 20), "blue square": (20, 20, 230),
           "yellow square": (240, 220, 10)}


def write_tiny_run(tmp: Path, max_steps: int = 6, checkpoint_every: int = 3, extra: str = "") -> Path:
    (tmp / "img").mkdir(parents=True, exist_ok=True)
    with open(tmp / "train.jsonl", "w") as f:
        for i in range(16):
            name = list(COLOURS)[i % 4]
            Image.new("RGB", (40, 40), COLOURS[name]).save(tmp / "img" / f"{i}.png")
            f.write(json.dumps({"image": f"img/{i}.png", "label": i % 4, "caption": f"a {name}"}) + "\n")
    cfg = tmp / "run.yaml"
    cfg.write_text(f"""_base_: {REPO / 'configs/model/tiny_moe.yaml'}
model:
  image_size: 32
  layer_scale_init: 0.1
target_sets:
  colours: {{kind: class_names, names: {json.dumps(list(COLOURS))}}}
tasks:
  - name: cls
    type: image_classification
    target_set: colours
    train_data: {{format: jsonl, root: {tmp}, annotations: {tmp / 'train.jsonl'}}}
    batch_size: 4
    label_smoothing: 0.1
  - name: ret
    type: image_retrieval
    train_data: {{format: jsonl, root: {tmp}, annotations: {tmp / 'train.jsonl'}}}
    batch_size: 4
train:
  output_dir: {tmp / 'out'}
  max_steps: {max_steps}
  checkpoint_every: {checkpoint_every}
  log_every: 1
  tensorboard: false
  optim: {{lr: 2.0e-3, warmup_steps: 2, weight_decay: 0.05}}
{extra}""")
    return cfg


def with_eval_data(cfg_path: Path) -> Path:
    """The tiny run, plus evaluation data for the classification task (its training images)."""
    text = cfg_path.read_text()
    train_line = next(line for line in text.splitlines() if "train_data" in line)
    text = text.replace(train_line, train_line + "\n" + train_line.replace("train_data", "eval_data"), 1)
    cfg_path.write_text(text)
    return cfg_path


def run_train(args: list[str], timeout: float = 240, nproc: int = 1, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "uniperceiver.train", *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port), "-m", "uniperceiver.train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

