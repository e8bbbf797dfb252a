"""Fine-tuning and prompt-tuning recipes load and validate; train.data_fraction is a pure function."""
from pathlib import Path

import pytest

from uniperceiver.config import RunConfig, load_config, to_dict
from uniperceiver.engine.sampler import DatasetSubset, fraction_indices

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted((CONFIGS / "finetune").glob("*.yaml")) + sorted((CONFIGS / "prompt_tuning").glob("*.yaml"))


def test_every_release_recipe_is_there():
    names = {p.stem for p in RECIPES}
    assert len(RECIPES) == 12
    assert names == {"imagenet1k", "k400", "coco_retrieval", "flickr30k_retrieval", "coco_caption", "msvd_caption"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_loads_and_validates(path, monkeypatch):
    monkeypatch.setenv("DATA_PATH", "/data")
    cfg = load_config(RunConfig, path)
    assert len(cfg.tasks) == 1 and cfg.tasks[0].train_data is not None and cfg.tasks[0].eval_data is not None
    assert cfg.model.moe.enabled and cfg.train.amp == "fp16"
    if path.parent.name == "prompt_tuning":
        assert cfg.model.prompt.enabled and cfg.train.data_fraction == 0.01 and cfg.train.optim.weight_decay == 0.0
        classification = cfg.tasks[0].type.endswith("classification")
        assert (cfg.model.prompt.fc_prompt_out > 0) == classification
        assert cfg.model.prompt.shared == (cfg.tasks[0].type != "image_retrieval")
    else:
        assert not cfg.model.prompt.enabled and cfg.train.data_fraction == 1.0


def test_data_fraction_is_the_same_on_every_rank_and_after_resume():
    a = fraction_indices(10_000, 0.01, seed=3, task_id=1)
    assert len(a) == 100 and a == sorted(set(a)) and all(0 <= i < 10_000 for i in a)
    assert a == fraction_indices(10_000, 0.01, seed=3, task_id=1)  # any rank, any time: no hidden state
    assert a != fraction_indices(10_000, 0.01, seed=4, task_id=1)
    assert a != fraction_indices(10_000, 0.01, seed=3, task_id=2)
    assert fraction_indices(50, 0.001, 0, 0) and len(fraction_indices(50, 0.001, 0, 0)) == 1
    assert fraction_indices(7, 1.0, 0, 0) == list(range(7))
    with pytest.raises(ValueError, match="data fraction"):
        fraction_indices(7, 0.0, 0, 0)

    class Data:
        num_classes = 3

        def __len__(self):
            return 10_000

        def __getitem__(self, key):
            return key

    sub = DatasetSubset(Data(), a)
    assert len(sub) == 100 and sub.num_classes == 3 and sub[(5, 99)] == (a[5], 99)


def test_data_fraction_is_validated():
    from uniperceiver.config import ConfigError

    with pytest.raises(ConfigError, match="data_fraction must be in"):
        load_config(RunConfig, data={}, overrides=["train.data_fraction=0"])


def test_a_resume_refuses_a_changed_data_fraction():
    from uniperceiver.engine.resume import config_changes, split_changes

    old = to_dict(load_config(RunConfig, data={}, overrides=["train.data_fraction=0.01"]))
    new = to_dict(load_config(RunConfig, data={}, overrides=["train.data_fraction=0.02", "train.optim.lr=0.5"]))
    applied, frozen = split_changes(config_changes(old, new))
    assert [c.key for c in frozen] == ["train.data_fraction"] and [c.key for c in applied] == ["train.optim.lr"]


def test_a_resume_refuses_a_changed_trainable_set():
    from uniperceiver.engine.resume import config_changes, split_changes

    old = to_dict(load_config(RunConfig, data={}))
    new = to_dict(load_config(RunConfig, data={}, overrides=["train.trainable=[prompt]"]))
    applied, frozen = split_changes(config_changes(old, new))
    assert [c.key for c in frozen] == ["train.trainable"] and applied == []
