"""End-to-end evaluation of a tiny random MoE model on synthetic data: classification, retrieval,
captioning and multi-view video classification; independence from the batch size; the
vocabulary encoded once per run; the on-disk target-set cache; pinned metrics and the JSON."""
import json
from dataclasses import replace

import pytest
import torch

import eval_fakes as F
from uniperceiver.data import build_target_set, make_collate
from uniperceiver.evaluation import evaluate, write_report
from uniperceiver.evaluation.target_features import TargetFeatures
from uniperceiver.tokenization import ClipTokenizer

pytestmark = pytest.mark.usefixtures("fake_data")  # eval_fakes' synthetic datasets
FAST_SCORERS = ("BLEU", "ROUGE_L", "CIDEr")  # METEOR's JVM start is covered in test_caption_metrics


@pytest.fixture(scope="module")
def model():
    return F.tiny_model(seed=0)


@pytest.fixture
def count_encodes(monkeypatch):
    calls: list[str] = []
    original = TargetFeatures.encode

    def counting(self, target_set):
        calls.append(target_set.name)
        return original(self, target_set)

    monkeypatch.setattr(TargetFeatures, "encode", counting)
    return calls


def _run(model, overrides=(), **kwargs):
    cfg = F.run_config(model.cfg, extra=list(overrides))
    return evaluate(cfg, model=model, progress=False, caption_scorers=FAST_SCORERS, **kwargs)


def _with_second_caption_task(cfg):
    """A second caption task over the same vocabulary (COCO + MSVD captioning in one run)."""
    cfg.tasks.append(replace(cfg.task("cap"), name="cap2", eval_data=replace(cfg.task("cap").eval_data,
                                                                             options={"n": 2})))
    return cfg


def test_end_to_end_and_batch_size_independence(model, count_encodes, tmp_path):
    cache = tmp_path / "cache"
    cfg = _with_second_caption_task(F.run_config(model.cfg, extra=[f"eval.cache_dir={cache}"]))
    a = evaluate(cfg, model=model, progress=False, caption_scorers=FAST_SCORERS)
    assert set(a.metrics) == {"cls", "ret", "cap", "cap2"}
    assert set(a.metrics["cls"]) == {"top1", "top5"}
    assert set(a.metrics["ret"]) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"R_mean"}
    assert {"Bleu_4", "ROUGE_L", "CIDEr"} <= set(a.metrics["cap"])
    for metrics in a.metrics.values():
        assert all(0.0 <= v <= 1000.0 for v in metrics.values())
    assert a.num_samples == {"cls": 13, "ret": 13, "cap": 5, "cap2": 2}
    assert [p["id"] for p in a.predictions["cap"]] == [f"s{i}" for i in range(5)]
    # class names and the vocabulary are each encoded once, although captioning ran 3 batches in
    # two tasks
    assert count_encodes == ["classes", "vocab"]

    # other batch sizes (1, 6, 4: partial last batches) give the same metrics and captions; the
    # target sets now come from the disk cache, nothing is re-encoded
    cfg = _with_second_caption_task(F.run_config(model.cfg, extra=[f"eval.cache_dir={cache}"]))
    for task, bs in zip(cfg.tasks, (1, 6, 4, 1)):
        task.eval_batch_size = bs
    b = evaluate(cfg, model=model, progress=False, caption_scorers=FAST_SCORERS)
    assert count_encodes == ["classes", "vocab"]
    assert b.meta["target_sets"]["loaded_from_cache"] == ["classes", "vocab"]
    assert b.metrics == a.metrics
    assert b.predictions == a.predictions


def test_multiview_video_classification_averages_probabilities(model):
    cfg = F.run_config(model.cfg)
    cls = cfg.task("cls")
    video = replace(cls, name="k400", type="video_classification", temperature="video_cls", frames=2,
                    eval_clips=2, eval_crops=3, eval_batch_size=3)
    video.eval_data.options.update(n=7, views=6)
    cfg.tasks = [video]
    report = evaluate(cfg, model=model, progress=False)

    # by hand: every view's softmax over the classes, averaged per video, then ranked
    ds = F.build_dataset(video, "eval", None, model.cfg, "")
    tok = ClipTokenizer()
    classes = build_target_set("classes", cfg.target_sets["classes"], tok).get()
    collate = make_collate(video, tok, training=False)
    with torch.no_grad():
        class_feats = model.encode_targets(classes)
        top1 = []
        for i in range(len(ds)):
            batch = collate([ds[i]])
            assert batch.inputs.batch_size == 6  # 2 clips x 3 crops
            feats = model.features(model.encode(batch.inputs).hidden_BLD[:, 0])
            probs = model.logits(feats, class_feats, "video_cls").softmax(-1).mean(0)
            top1.append(int(probs.argmax()) == ds[i]["label"])
    assert report.metrics["k400"]["top1"] == pytest.approx(100.0 * sum(top1) / len(top1))

    video.eval_clips = 1  # the collate still gives 6 views: a clear error, not a wrong metric
    with pytest.raises(ValueError, match="6 views per sample, but eval_clips x eval_crops = 3"):
        evaluate(cfg, model=model, progress=False)


def test_pinned_metrics_and_json(model, tmp_path):
    cfg_overrides = ["eval.tasks=[cls]", "eval.tolerance=0.5"]
    first = _run(model, cfg_overrides)
    top1 = first.metrics["cls"]["top1"]
    ok = _run(model, cfg_overrides + [f"eval.expected={{cls/top1: {top1 + 0.4}}}"])
    assert ok.passed and ok.checks[0]["ok"]
    miss = _run(model, cfg_overrides + [f"eval.expected={{cls/top1: {top1 + 1.0}, cls/top7: 1.0}}"])
    assert not miss.passed
    assert [m["key"] for m in miss.misses] == ["cls/top1", "cls/top7"]
    table = miss.table()
    assert "MISS" in table and "MISSING" in table

    out = tmp_path / "eval.json"
    written = write_report(miss, str(out))
    assert written == [str(out)]
    blob = json.loads(out.read_text())
    assert blob["metrics"]["cls"]["top1"] == top1
    assert blob["passed"] is False
    assert blob["config"]["eval"]["tolerance"] == 0.5
    assert blob["config"]["model"]["d_model"] == 64
    assert {"python", "torch"} <= set(blob["versions"])
    assert "checkpoint" in blob and blob["world_size"] == 1


def test_token_routed_moe_drops_no_token(monkeypatch):
    """A token-routed MoE whose eval capacity would drop tokens: evaluation runs it dropless, so
    its metrics do not depend on the batch size (with the capacity they do)."""
    import contextlib

    from uniperceiver.config import ModelConfig, from_dict
    from uniperceiver.evaluation import runner
    from uniperceiver.modeling.model import UniPerceiver

    cfg = from_dict(ModelConfig, {
        "d_model": 64, "num_layers": 2, "num_heads": 4, "d_ffn": 128, "image_size": F.IMAGE, "layer_scale_init": 1.0,
        "moe": {"enabled": True, "routing": {"router": "token", "noise": "none", "num_experts": 4, "top_k": 1,
                                             "capacity_factor_eval": 0.25, "min_capacity": 0}}})
    torch.manual_seed(0)
    model = UniPerceiver(cfg).eval()

    def metrics(batch_size):
        run_cfg = F.run_config(model.cfg, extra=["eval.tasks=[ret]"])
        run_cfg.task("ret").eval_batch_size = batch_size
        return evaluate(run_cfg, model=model, progress=False).metrics

    assert metrics(1) == metrics(13)
    assert not model.encoder.layers[0].qkv.cfg.dropless  # the model's own settings are restored
    monkeypatch.setattr(runner, "eval_settings", lambda m: contextlib.nullcontext())
    assert metrics(1) != metrics(13)  # the control: with capacity, batching changes the result
