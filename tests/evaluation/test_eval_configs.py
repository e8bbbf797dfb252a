"""The zero-shot configs load, mirror the release's procedures (OFFICIAL.md 4.3), and pin only
metrics their tasks produce."""
import glob
import os
import typing

import pytest

from uniperceiver.config import RunConfig, load_config
from uniperceiver.config.schema import DataFormat
from uniperceiver.evaluation.loop import eval_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs/zeroshot/*.yaml"))
                 if not os.path.basename(p).startswith("_"))
METRICS = {
    "classification": {"top1", "top5"},
    "retrieval": {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"R_mean"},
    "caption": {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"},
}


def _load(path):
    with open(path) as f:
        text = f.read()
    if "format: msvd" in text and "msvd" not in typing.get_args(DataFormat):
        pytest.skip("the `msvd` data format (caption_msvd_*_cocostyle.json + YouTubeClips) is not in the "
                    "data layer yet")
    return load_config(RunConfig, path)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_zeroshot_config(path):
    cfg = _load(path)
    assert any(t.eval_data is not None for t in cfg.tasks)
    for key in cfg.eval.expected:
        task, metric = key.split("/")
        kind = cfg.task(task).type.split("_")[1]
        assert metric in METRICS[kind], key
    if os.path.basename(path) == "demo.yaml":
        return
    assert cfg.model.d_model == 768 and cfg.model.moe.enabled and cfg.model.image_size == 224
    for task in eval_tasks(cfg):
        if task.type.endswith("caption"):
            assert (task.beam_size, task.max_gen_len, task.len_penalty) == (2, 21, 2.0)
            assert cfg.target_sets[task.target_set].kind == "vocabulary"
        if task.type == "video_classification":
            assert (task.frames, task.eval_clips, task.eval_crops) == (8, 4, 3)
    if "msvd_retrieval" not in path:  # the release's MSVD retrieval config leaves the scale at 1.0
        assert cfg.model.posembed_scale == pytest.approx(160 / 224)


def test_class_name_lists():
    imagenet = load_config(RunConfig, os.path.join(ROOT, "configs/zeroshot/imagenet1k.yaml"))
    names = imagenet.target_sets["imagenet1k"].names
    assert len(names) == 1000 and names[:3] == ["tench", "goldfish", "great white shark"]
    k400 = load_config(RunConfig, os.path.join(ROOT, "configs/zeroshot/k400.yaml"))
    names = k400.target_sets["kinetics400"].names
    assert len(names) == 400 and names == sorted(names) and names[0] == "abseiling"
