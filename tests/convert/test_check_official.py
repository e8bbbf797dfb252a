"""check_official on the shipped official reference and on synthetic bundles."""
import copy
from pathlib import Path

import pytest
import torch

from uniperceiver.config import ModelConfig
from uniperceiver.convert.export import to_official_state_dict
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.tools.check_official import check_bundle, main

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "official_tiny" / "reference.pt"


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE.exists():
        pytest.skip(f"official reference not found at {REFERENCE}")
    return torch.load(REFERENCE, weights_only=True)


def test_reference_bundle_passes(reference, tmp_path):
    out = tmp_path / "check.json"
    assert main([str(REFERENCE), "--json", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert not result["failed"] and result["worst_rel"] < 1e-5
    keys = result["quantities"]
    assert "mscoco_caption/G_SENTS_IDS" in keys and keys["mscoco_caption/G_SENTS_IDS"]["exact"]
    assert "bookswiki_pretrain/logits" in keys and "imagenet/train_det/LabelSmoothing" in keys


def _small_bundle(reference, model: UniPerceiver, tasks=("imagenet", "mscoco_retrieve")) -> dict:
    """A bundle shaped like the reference for another (dense) model: its expected values come
    from our own model, so this tests the plumbing (dense keys, other sizes), not the numbers."""
    bundle = {"state_dict": to_official_state_dict(model), "config": {"num_heads": model.cfg.num_heads},
              "official_config_yaml": reference["official_config_yaml"],
              "batches_eval": {t: reference["batches_eval"][t] for t in tasks}, "eval": {}}
    return bundle


def test_dense_bundle_of_another_size(reference):
    torch.manual_seed(0)
    model = UniPerceiver(ModelConfig(d_model=64, num_layers=2, num_heads=2, d_ffn=128, image_size=64,
                                     layer_scale_init=1.0)).eval()
    bundle = _small_bundle(reference, model)
    from uniperceiver.convert.official_batches import shared_target_sets, translate_batch
    from uniperceiver.tasks import run_task

    expected = {}
    with torch.no_grad():
        for task, raw in bundle["batches_eval"].items():
            batch = translate_batch(raw, None, training=False)
            sets = {k: model.encode_targets(v) for k, v in shared_target_sets(raw).items()}
            out = run_task(model, batch, sets)
            expected[task] = {"logits": out.logits} if out.logits is not None else {
                "input_feats": out.extras["input_feats"], "tgt_feats": out.extras["target_feats"]}
    bundle["eval"] = expected
    cmp = check_bundle(bundle)
    assert not cmp.failed() and "imagenet/logits" in cmp.results
    # a perturbed reference value is caught
    broken = copy.deepcopy(bundle)
    broken["eval"]["imagenet"]["logits"] = broken["eval"]["imagenet"]["logits"] * 1.01
    assert "imagenet/logits" in check_bundle(broken).failed()
