"""Our caption metrics == a direct pycocotools + pycocoevalcap `COCOEvalCap` call (the release's
COCOEvaler path), and SPICE is skipped, not downloaded, when its jars are absent.

METEOR starts a JVM that loads a paraphrase table (~10-20 s on 2 cores); both paths share one
METEOR process so the comparison pays that once.
"""
import contextlib
import functools
import io
import shutil

import pytest

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="caption metrics need Java")

pycocoevalcap = pytest.importorskip("pycocoevalcap")

from uniperceiver.evaluation.caption_metrics import caption_metrics, spice_available  # noqa: E402

REFS = {
    3: ["A man riding a wave on top of a surfboard.", "a surfer rides a large wave", "Person surfing in the ocean"],
    7: ["Two dogs play with a frisbee in the park.", "dogs playing on grass", "two brown dogs and a red frisbee",
        "A pair of dogs chase a toy outside"],
    11: ["A plate of food with broccoli and rice", "a dinner plate with vegetables"],
    12: ["a red double decker bus on a city street", "A bus drives down the road.", "red bus in london"],
}
PREDS = {3: "a man riding a wave on a surfboard", 7: "two dogs playing with a frisbee", 11: "", 12: "a red bus on the street"}


@functools.lru_cache(maxsize=1)
def _shared_meteor():
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


@pytest.fixture
def one_meteor(monkeypatch):
    import pycocoevalcap.eval as coco_eval
    import pycocoevalcap.meteor.meteor as meteor_mod

    meteor = _shared_meteor()
    monkeypatch.setattr(meteor_mod, "Meteor", lambda: meteor)
    monkeypatch.setattr(coco_eval, "Meteor", lambda: meteor)
    return meteor


def _direct(refs, preds):
    """The release's COCOEvaler: COCO(annotations) + loadRes(results) + COCOEvalCap.evaluate()."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:  # COCOEvalCap always runs SPICE (and would download CoreNLP): leave it out
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    gt = {"images": [{"id": i} for i in refs], "type": "captions", "info": {}, "licenses": [],
          "annotations": [{"image_id": i, "id": n, "caption": c}
                          for n, (i, c) in enumerate((i, c) for i in refs for c in refs[i])]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        res = coco.loadRes([{"image_id": i, "caption": c} for i, c in preds.items()])
        ev = coco_eval.COCOEvalCap(coco, res)
        saved = coco_eval.Spice
        coco_eval.Spice = NoSpice
        try:
            ev.evaluate()
        finally:
            coco_eval.Spice = saved
    return {k: 100.0 * v for k, v in ev.eval.items() if k != "SPICE"}


def test_caption_metrics_equal_direct_pycocoevalcap(one_meteor):
    ours, notes = caption_metrics(REFS, PREDS, spice=False)
    direct = _direct(REFS, PREDS)
    assert set(ours) == set(direct) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    for name, value in direct.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    assert 0 < ours["CIDEr"] and 0 < ours["Bleu_1"] <= 100


def test_scorer_subset_and_spice_note(monkeypatch):
    metrics, notes = caption_metrics(REFS, PREDS, scorers=("BLEU", "CIDEr", "SPICE"))
    assert set(metrics) >= {"Bleu_4", "CIDEr"} and "METEOR" not in metrics
    available, why = spice_available()
    if not available:
        assert "SPICE" not in metrics and any("SPICE skipped" in n for n in notes)
        with pytest.raises(RuntimeError, match="SPICE skipped"):
            caption_metrics(REFS, PREDS, spice=True, scorers=("BLEU",))


def test_caption_metrics_input_errors():
    with pytest.raises(ValueError, match="disagree on image ids"):
        caption_metrics(REFS, {3: "a"}, scorers=("BLEU",))
    with pytest.raises(ValueError, match="no reference captions"):
        caption_metrics({1: []}, {1: "a"}, scorers=("BLEU",))
    with pytest.raises(ValueError, match="unknown caption scorers"):
        caption_metrics(REFS, PREDS, scorers=("BLEU", "WER"))
