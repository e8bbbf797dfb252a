"""Tiny synthetic eval data for the evaluation tests, following the eval sample convention of
`uniperceiver.data` (`image` [3,H,W] / `video` [T,3,H,W] or [V,T,3,H,W], `label`, `captions`,
`id`); `use_fake_data` makes evaluation read it (collation and target sets are the real ones).

Also runnable as a script, to evaluate in one of several processes (set RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT as torchrun does):

    python eval_fakes.py MODEL.pt OUT.json [key=value ...]      # the synthetic tasks below
    python eval_fakes.py CONFIG.yaml OUT.json [key=value ...]   # a config's real data
"""
from __future__ import annotations

import json
import sys

import torch

from uniperceiver.api import vocabulary_target_set
from uniperceiver.config import ModelConfig, RunConfig, from_dict, load_config, to_dict
from uniperceiver.modeling.attributes import target_set_attributes, task_attributes
from uniperceiver.modeling.batch import Segment, Sequence, TargetSet, TaskBatch
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.tasks import task_spec

IMAGE = 32
WORDS = ["red", "green", "blue", "small", "large", "round", "square", "cat", "dog", "car", "tree", "boat"]


def tiny_model_config(moe: bool = True) -> ModelConfig:
    data = {"d_model": 64, "num_layers": 2, "num_heads": 4, "d_ffn": 128, "image_size": IMAGE,
            "patch_size": 16, "layer_scale_init": 1.0, "drop_path": 0.0}
    if moe:
        data["moe"] = {"enabled": True, "layers": "even",
                       "routing": {"router": "attribute", "num_experts": 4, "top_k": 2}}
    return from_dict(ModelConfig, data)


def tiny_model(seed: int = 0, moe: bool = True) -> UniPerceiver:
    torch.manual_seed(seed)
    return UniPerceiver(tiny_model_config(moe)).eval()


def run_config(model_cfg: ModelConfig | None = None, n: int = 13, extra: list[str] = ()) -> RunConfig:
    """Classification (10 classes), retrieval (3 captions per image, one with 4) and captioning."""
    data = {
        "model": to_dict(model_cfg or tiny_model_config()),
        "target_sets": {
            "classes": {"kind": "class_names", "names": [f"{w} thing" for w in WORDS[:10]]},
            "vocab": {"kind": "vocabulary"},
        },
        "tasks": [
            {"name": "cls", "type": "image_classification", "target_set": "classes", "eval_batch_size": 4,
             "eval_data": {"format": "jsonl", "options": {"n": n}}},
            {"name": "ret", "type": "image_retrieval", "eval_batch_size": 5,
             "eval_data": {"format": "jsonl", "options": {"n": n, **_broken()}}},
            {"name": "cap", "type": "image_caption", "target_set": "vocab", "eval_batch_size": 3,
             "beam_size": 2, "max_gen_len": 5, "len_penalty": 2.0,
             "eval_data": {"format": "jsonl", "options": {"n": 5}}},
        ],
        "train": {"device": "cpu"},
    }
    return load_config(RunConfig, data=data, overrides=list(extra))


def _broken() -> dict:
    """EVAL_FAKES_FAIL_AT=i makes sample i of the retrieval task raise (error-propagation tests)."""
    import os

    at = os.environ.get("EVAL_FAKES_FAIL_AT")
    return {} if at is None else {"fail_at": int(at)}


def _pixels(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _caption(gen: torch.Generator, length: int = 4) -> str:
    return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=gen))


class FakeDataset:
    """Deterministic samples (a function of the index only)."""

    def __init__(self, task, n: int, num_classes: int | None = None, views: int = 1, frames: int = 2) -> None:
        self.task, self.n, self.views, self.frames = task, n, views, frames
        if num_classes is not None:
            self.num_classes = num_classes
        self.reads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        if i == getattr(self, "fail_at", None):
            raise ValueError(f"sample {i} is broken")
        self.reads += 1
        gen = torch.Generator().manual_seed(1000 + i)
        sample: dict = {"id": f"s{i}"}
        if task_spec(self.task.type).modality == "video":
            shape = (self.frames, 3, IMAGE, IMAGE) if self.views == 1 else (self.views, self.frames, 3, IMAGE, IMAGE)
            sample["video"] = _pixels(gen, *shape)
        else:
            sample["image"] = _pixels(gen, 3, IMAGE, IMAGE)
        if task_spec(self.task.type).class_labels:
            sample["label"] = i % getattr(self, "num_classes", 10)
        else:
            sample["captions"] = [_caption(gen) for _ in range(4 if i % 4 == 1 else 3)]
        return sample


def build_dataset(task, split, tokenizer, model_cfg, data_root, num_classes=None):
    opts = task.eval_data.options
    spec = task_spec(task.type)
    views = task.eval_clips * task.eval_crops if spec.class_labels and spec.modality == "video" else 1
    views = int(opts.get("views", views))
    ds = FakeDataset(task, int(opts.get("n", 8)), opts.get("num_classes"), views=views, frames=task.frames)
    if "fail_at" in opts:
        ds.fail_at = int(opts["fail_at"])
    if "class_names" in opts:  # as Kinetics' category_mapping.txt
        ds.class_names, ds.category_file = list(opts["class_names"]), "category_mapping.txt"
    return ds


def use_fake_data(monkeypatch=None) -> None:
    """Evaluation reads the synthetic datasets above instead of the config's data: the loop's one
    data entry point (`uniperceiver.evaluation.loop.build_dataset`) is replaced; collation and
    target sets stay the real ones (each task type's TaskSpec)."""
    from uniperceiver.evaluation import loop

    if monkeypatch is None:  # a process of its own (main below)
        loop.build_dataset = build_dataset
    else:
        monkeypatch.setattr(loop, "build_dataset", build_dataset)


def main(argv: list[str]) -> int:
    """`fakes MODEL.pt OUT.json [overrides]`: the synthetic tasks of `run_config` with the model
    file's weights; `CONFIG.yaml OUT.json [overrides]`: the config's own data and checkpoint."""
    import torch.distributed as dist

    from uniperceiver.distributed import init_distributed
    from uniperceiver.evaluation import evaluate

    torch.set_num_threads(1)
    source, out_path, *overrides = argv
    init_distributed("cpu")
    if source.endswith(".yaml"):
        cfg = load_config(RunConfig, source, overrides)
        report = evaluate(cfg, progress=False, caption_scorers=("BLEU", "CIDEr"))
    else:
        blob = torch.load(source, weights_only=True)
        model = UniPerceiver(from_dict(ModelConfig, blob["config"]))
        model.load_state_dict(blob["model"])
        cfg = run_config(model.cfg, extra=overrides)
        use_fake_data()
        report = evaluate(cfg, model=model, progress=False, caption_scorers=("BLEU", "CIDEr"))
    if dist.is_initialized():
        dist.destroy_process_group()
    with open(out_path, "w") as f:
        json.dump({"metrics": report.metrics, "predictions": report.predictions}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
