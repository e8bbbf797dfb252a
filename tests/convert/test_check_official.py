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


PROMPT_REFERENCE = REFERENCE.parents[1] / "official_prompt" / "reference_prompt_a.pt"
SMALL_SET_TASKS = ["imagenet", "K400_retrieve", "mscoco_retrieve"]


@pytest.fixture(scope="module")
def prompt_reference():
    if not PROMPT_REFERENCE.exists():
        pytest.skip(f"official prompt reference not found at {PROMPT_REFERENCE}")
    return torch.load(PROMPT_REFERENCE, weights_only=True)


def test_prompt_bundle_passes_with_gradients_of_the_small_target_sets(prompt_reference):
    """Every eval output, loss, the trainable set and the gradients of the tasks whose target sets
    are small (the vocabulary tasks' gradients are in the slow test below)."""
    cmp = check_bundle(prompt_reference, grad_tasks=SMALL_SET_TASKS)
    assert not cmp.failed(), cmp.failed()
    keys = cmp.results
    assert keys["prompt/trainable_set"]["exact"] and keys["prompt/trainable_numel"]["exact"]
    assert "imagenet/grad/fc_prompt.weight" in keys and "imagenet/grad/similarity_weight" in keys
    assert keys["K400_retrieve/grad/fc_prompt.weight"]["exact"]  # no FC prompt outside imagenet
    assert "mscoco_caption/all_beams/G_LOGP" in keys and "bookswiki_pretrain/logits" in keys
    grads = [k for k in keys if "/grad/" in k]
    assert len(grads) == len(SMALL_SET_TASKS) * len(prompt_reference["prompt"]["trainable"])


@pytest.mark.slow
def test_prompt_bundle_passes_in_full(tmp_path):
    """The whole bundle, vocabulary gradients included (one 49,411-sequence backward, ~5 GB)."""
    if not PROMPT_REFERENCE.exists():
        pytest.skip(f"official prompt reference not found at {PROMPT_REFERENCE}")
    out = tmp_path / "check.json"
    assert main([str(PROMPT_REFERENCE), "--json", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert not result["failed"] and result["worst_rel"] < 1e-4
    assert "mscoco_caption/grad/fused_encoder.layers.1.norm1.weight" in result["quantities"]


def test_prompt_bundle_of_another_shape(reference):
    """Separate input/target deep prompts of different lengths, a fixed similarity weight, another
    size and beam setting: values from our own model, so this tests that nothing is hard-coded."""
    from uniperceiver.config import ModelMoEConfig, PromptConfig
    from uniperceiver.convert.official_batches import parse_official_tasks, shared_target_sets, translate_batch
    from uniperceiver.convert.export import official_names
    from uniperceiver.modeling.freezing import apply_trainable
    from uniperceiver.tasks import beam_search, run_task
    from uniperceiver.tools.check_official import _gradients

    torch.manual_seed(0)
    prompt = PromptConfig(enabled=True, input_length=3, shared=False, target_length=6, fc_prompt_out=10,
                          fc_prompt_tasks=["imagenet"], similarity_weight="fixed", similarity_weight_value=0.0)
    cfg = ModelConfig(d_model=48, num_layers=3, num_heads=3, d_ffn=96, image_size=64, layer_scale_init=1.0,
                      drop_path=0.0, moe=ModelMoEConfig(enabled=True, layer_ids=[1], layers="all"), prompt=prompt)
    model = UniPerceiver(cfg)
    with torch.no_grad():
        for p in (model.predictor.fc_prompt.weight, model.predictor.fc_prompt.bias, model.embed.s_token_bias):
            p.normal_(0, 0.3)
    model.cfg.moe.routing.noise = "none"
    substrings = ["norm", "deep_prompt_embedding", "fc_prompt", "s_token_bias"]
    trainable = apply_trainable(model, substrings)
    tasks = ["imagenet", "mscoco_retrieve", "mscoco_caption"]
    settings = parse_official_tasks(reference["official_config_yaml"])
    bundle = {"state_dict": to_official_state_dict(model), "config": {"num_heads": 3, "moe_type": "attribute"},
              "official_config_yaml": reference["official_config_yaml"],
              "batches_eval": {t: reference["batches_eval"][t] for t in tasks},
              "batches_train": {t: reference["batches_train"][t] for t in ("imagenet", "mscoco_retrieve")},
              "eval": {}, "eval_beams": {}, "grads": {},
              "prompt": {"switches": {"PROMPT_PARAM": substrings}, "fc_prompt_tasks": ["imagenet"],
                         "trainable": [[official_names(n, model)[0], list(dict(model.named_parameters())[n].shape)]
                                       for n in trainable]}}
    assert "fused_encoder.layers.2.deep_prompt_embedding.target_embedding.weight" in bundle["state_dict"]
    model.eval()
    with torch.no_grad():
        for task in tasks:
            raw = reference["batches_eval"][task]
            batch = translate_batch(raw, settings.get(task), training=False)
            sets = {k: model.encode_targets(v) for k, v in shared_target_sets(raw).items()}
            if batch.kind == "caption":
                out = beam_search(model, batch.inputs, batch.decode_attributes_SA, sets[batch.target_set],
                                  temperature=batch.temperature, beam_size=3, max_len=4, len_penalty=0.5)
                bundle["eval"][task] = {"G_SENTS_IDS": out.ids_BT, "G_LOGP": out.logprobs_BT}
                bundle["eval_beams"][task] = {"G_SENTS_IDS": out.beam_ids_BKT, "G_LOGP": out.beam_logprobs_BKT,
                                              "beam_size": 3, "len_penalty": 0.5, "max_steps": 4}
                continue
            out = run_task(model, batch, sets)
            bundle["eval"][task] = {"logits": out.logits} if batch.kind != "retrieval" else {
                "input_feats": out.extras["input_feats"], "tgt_feats": out.extras["target_feats"]}
    for task, raw in bundle["batches_train"].items():
        batch = translate_batch(raw, settings.get(task), training=True)
        bundle["grads"][task] = _gradients(model, batch, shared_target_sets(raw), [0], None, 0)
    cmp = check_bundle(bundle)
    assert not cmp.failed(), cmp.failed()
    assert cmp.results["prompt/trainable_set"]["exact"]
    assert "imagenet/grad/fused_encoder.layers.0.deep_prompt_embedding.target_embedding.weight" in cmp.results
    assert cmp.results["mscoco_caption/all_beams/G_SENTS_IDS"]["exact"]
    # a wrong gradient, a wrong trainable set and a wrong beam are each caught
    broken = copy.deepcopy(bundle)
    broken["grads"]["imagenet"]["fc_prompt.bias"] = broken["grads"]["imagenet"]["fc_prompt.bias"] * 1.01
    broken["prompt"]["trainable"] = broken["prompt"]["trainable"][1:]
    broken["eval_beams"]["mscoco_caption"]["G_LOGP"] = broken["eval_beams"]["mscoco_caption"]["G_LOGP"] + 0.01
    failed = check_bundle(broken).failed()
    assert {"imagenet/grad/fc_prompt.bias", "prompt/trainable_set", "mscoco_caption/all_beams/G_LOGP"} <= set(failed)


def test_dense_bundle_with_empty_gate_lists(reference):
    """A dense model (MoE off) routes nothing: a bundle whose `gates` entry holds an empty list per
    task (what the official code logs without MoE) passes; gate calls that routed nothing do not
    count. A task whose reference did route still fails on the call count."""
    from uniperceiver.config import RunConfig, load_config
    from uniperceiver.convert.official_batches import shared_target_sets, translate_batch
    from uniperceiver.tasks import run_task

    tiny_dense = Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny_dense.yaml"
    cfg = load_config(RunConfig, str(tiny_dense), ["model.layer_scale_init=1.0", "model.drop_path=0.0"]).model
    assert not cfg.moe.enabled
    torch.manual_seed(0)
    model = UniPerceiver(cfg).eval()
    tasks = ("imagenet", "K400_retrieve", "mscoco_retrieve")
    bundle = _small_bundle(reference, model, tasks)
    with torch.no_grad():
        for task, raw in bundle["batches_eval"].items():
            batch = translate_batch(raw, None, training=False)
            sets = {k: model.encode_targets(v) for k, v in shared_target_sets(raw).items()}
            out = run_task(model, batch, sets)
            assert not out.decisions  # dense: nothing routed
            bundle["eval"][task] = {"logits": out.logits} if out.logits is not None else {
                "input_feats": out.extras["input_feats"], "tgt_feats": out.extras["target_feats"]}
    bundle["gates"] = {task: [] for task in tasks}
    cmp = check_bundle(bundle)
    assert not cmp.failed(), cmp.failed()
    assert not [k for k in cmp.results if "/gates/" in k]
    assert "imagenet/logits" in cmp.results and "mscoco_retrieve/tgt_feats" in cmp.results

    # the control: where the reference routed and we did not, the call count still differs
    from uniperceiver.tools.check_official import Comparison, _compare_gates

    control = Comparison(1e-4)
    _compare_gates(control, "imagenet", [[], []], reference["gates"]["imagenet"])
    assert control.failed() == ["imagenet/gates/num_calls"]
