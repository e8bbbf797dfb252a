"""Prompt tuning as the release does it: freezing by substring, deep prompts, s_token_bias, FC prompt."""
import pytest
import torch
from torch import nn

import uniperceiver.modeling.encoder as encoder_module
from uniperceiver.config import ConfigError, ModelConfig, ModelMoEConfig, PromptConfig, RunConfig, from_dict, load_config
from uniperceiver.modeling.attributes import target_set_attributes, task_attributes
from uniperceiver.modeling.batch import Segment, Sequence, TargetSet, TaskBatch
from uniperceiver.modeling.freezing import apply_trainable, trainable_substrings
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.tasks import run_task

RELEASE = ["s_token_bias", "norm", "prompt_embed", "deep_prompt_embedding", "fc_prompt", "similarity_weight", "ln_post"]


def _cfg(prompt: PromptConfig | None = None, moe: bool = True) -> ModelConfig:
    return ModelConfig(d_model=32, num_layers=2, num_heads=4, d_ffn=64, image_size=32, layer_scale_init=1.0,
                       drop_path=0.0, moe=ModelMoEConfig(enabled=moe), prompt=prompt or PromptConfig())


def _caption_seq() -> Sequence:
    text = torch.tensor([[320, 786, 49407, 0, 49410, 49410, 49410, 49410],
                         [1237, 3255, 1453, 49407, 49410, 49410, 49410, 49410]])
    seg = Segment("text", text, text == 0, torch.arange(4).repeat(2))
    return Sequence([Segment("image", torch.randn(2, 3, 32, 32)), seg],
                    attributes_SA=task_attributes("image_caption"), caption_queries=True)


def test_freezing_by_substring_decides_shared_tensors_by_their_first_name():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token_norm = nn.LayerNorm(4)
            self.video_proj = self.token_norm  # one tensor, two names: the first decides
            self.proj = nn.Linear(4, 4)
            self.bias = nn.Parameter(torch.zeros(4))
            self.alias_of_bias = self.bias

    m = Shared()
    names = apply_trainable(m, ["norm"])
    assert names == ["token_norm.weight", "token_norm.bias"]
    assert m.video_proj.weight.requires_grad and m.token_norm.bias.requires_grad
    assert not m.proj.weight.requires_grad and not m.bias.requires_grad
    # "alias" matches only the second name of `bias`: still frozen
    assert apply_trainable(m, ["alias", "proj"]) == ["proj.weight", "proj.bias"]
    assert not m.bias.requires_grad and not m.token_norm.weight.requires_grad
    assert len(apply_trainable(m, None)) == 5 and all(p.requires_grad for p in m.parameters())


def test_release_list_trains_norms_prompts_and_leaves_gate_layernorm_frozen():
    model = UniPerceiver(_cfg(PromptConfig(enabled=True, fc_prompt_out=5)))
    substrings = trainable_substrings(model.cfg, None)
    assert substrings == RELEASE
    names = set(apply_trainable(model, substrings))
    assert {"embed.s_token_bias", "embed.norm.weight", "predictor.ln_post.bias", "predictor.fc_prompt.weight",
            "predictor.similarity_weight", "encoder.layers.1.norm1.weight",
            "encoder.layers.0.deep_prompt_embedding.input_PD"} <= names
    assert not any("router" in n or "weight_EOI" in n or "logit_scale" in n or "gamma" in n for n in names)
    router_ln = model.encoder.layers[0].qkv.router.tag_transform[1]
    assert isinstance(router_ln, nn.LayerNorm) and not router_ln.weight.requires_grad
    # without prompt tuning nothing is frozen unless train.trainable says so
    assert trainable_substrings(_cfg(), None) is None and trainable_substrings(_cfg(), ["norm"]) == ["norm"]


def test_deep_prompts_are_never_masked_and_absent_from_the_next_layer(monkeypatch):
    torch.manual_seed(0)
    prompt = PromptConfig(enabled=True, input_length=3, shared=False, target_length=5)
    model = UniPerceiver(_cfg(prompt)).eval()
    seen = []
    real_sdpa = encoder_module.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None):
        seen.append((q.shape[2], k.shape[2], attn_mask))
        return real_sdpa(q, k, v, attn_mask=attn_mask)

    monkeypatch.setattr(encoder_module.F, "scaled_dot_product_attention", spy)
    layer_inputs = []
    for layer in model.encoder.layers:
        # A layer's input is the encoder call's joint row of tokens [B*L, D] (encoder.TokenLayout).
        layer.register_forward_pre_hook(lambda mod, args: layer_inputs.append(args[0].shape[0]))
    seq = _caption_seq()
    with torch.no_grad():
        out = model.encode(seq)
    length = out.hidden_BLD.shape[1]
    tokens = out.hidden_BLD.shape[0] * length
    assert layer_inputs == [tokens, tokens]  # prompts never reach the next layer
    for q_len, k_len, mask in seen:
        assert (q_len, k_len) == (length, length + 3)
        assert mask is not None and bool(mask[..., :3].all())  # every query sees every prompt
        assert not bool(mask[..., 3:].all())  # while the caption mask and padding still apply
    # targets use their own (5-token) prompts
    seen.clear()
    target = TargetSet("names", torch.tensor([[320, 49407], [786, 49407]]), None,
                       attributes_SA=target_set_attributes("class_names"))
    with torch.no_grad():
        model.encode(target.slice(0, 2))
    assert all(k_len == q_len + 5 for q_len, k_len, _ in seen)
    # each layer's prompts change only through that layer: moving layer 1's prompts moves the output
    with torch.no_grad():
        before = model.encode(seq).hidden_BLD
        model.encoder.layers[1].deep_prompt_embedding.input_PD.add_(1.0)
        after = model.encode(seq).hidden_BLD
    assert not torch.allclose(before, after)


def test_s_token_bias_moves_every_spe_token():
    torch.manual_seed(0)
    model = UniPerceiver(_cfg(PromptConfig(enabled=True, deep_prompt=False))).eval()
    ids = torch.tensor([[320, 49410, 786]])
    with torch.no_grad():
        spe0, text0 = model.embed.spe(1).clone(), model.embed.text(ids).clone()
        model.embed.s_token_bias.normal_()
        spe1, text1 = model.embed.spe(1), model.embed.text(ids)
    assert not torch.allclose(spe0, spe1)
    assert not torch.allclose(text0[:, 1], text1[:, 1])
    assert torch.equal(text0[:, [0, 2]], text1[:, [0, 2]])


def _classification_batch(task: str = "cls") -> tuple[TaskBatch, TargetSet]:
    names = TargetSet("names", torch.tensor([[320, 49407], [786, 49407], [1237, 49407]]), None,
                      attributes_SA=target_set_attributes("class_names"))
    seq = Sequence([Segment("image", torch.randn(2, 3, 32, 32))], attributes_SA=task_attributes("image_classification"))
    return TaskBatch(task, "classification", "img_cls", seq, labels=torch.tensor([0, 2]), target_set="names"), names


def test_fc_prompt_starts_at_zero_and_leaves_logits_unchanged():
    torch.manual_seed(0)
    base = UniPerceiver(_cfg()).eval()
    prompted = UniPerceiver(_cfg(PromptConfig(enabled=True, deep_prompt=False, fc_prompt_out=3))).eval()
    missing = prompted.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["embed.s_token_bias", "predictor.fc_prompt.bias", "predictor.fc_prompt.weight",
                               "predictor.similarity_weight"]
    assert not prompted.predictor.fc_prompt.weight.any() and float(prompted.predictor.similarity_weight.detach()) == 1.0
    batch, names = _classification_batch()
    with torch.no_grad():
        ref = run_task(base, batch, {"names": base.encode_targets(names)}).logits
        out = run_task(prompted, batch, {"names": prompted.encode_targets(names)}).logits
        assert torch.equal(out, ref)
        # a trained FC prompt reads the feature before normalisation
        prompted.predictor.fc_prompt.bias.fill_(0.5)
        prompted.predictor.similarity_weight.fill_(2.0)
        moved = run_task(prompted, batch, {"names": prompted.encode_targets(names)}).logits
    assert torch.allclose(moved, 2.0 * ref + 0.5, atol=1e-5)
    # a class count the FC prompt was not built for is refused
    wrong = TargetSet("names", names.ids_NL[:2], None, attributes_SA=names.attributes_SA)
    with pytest.raises(ValueError, match="FC prompt has 3 outputs"):
        run_task(prompted, batch, {"names": prompted.encode_targets(wrong)})


def test_fc_prompt_only_for_the_named_tasks_and_fixed_similarity_weight():
    torch.manual_seed(0)
    model = UniPerceiver(_cfg(PromptConfig(enabled=True, deep_prompt=False, fc_prompt_out=3, fc_prompt_tasks=["a"],
                                           similarity_weight="fixed", similarity_weight_value=0.0))).eval()
    assert "predictor.similarity_weight" not in dict(model.named_parameters())
    with torch.no_grad():
        model.predictor.fc_prompt.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
        batch, names = _classification_batch("a")
        feats = {"names": model.encode_targets(names)}
        assert torch.equal(run_task(model, batch, feats).logits, torch.tensor([[1.0, 2.0, 3.0]] * 2))
        other, _ = _classification_batch("b")
        assert not torch.equal(run_task(model, other, feats).logits, torch.tensor([[1.0, 2.0, 3.0]] * 2))


def test_prompt_gradients_reach_only_the_trainable_set():
    torch.manual_seed(0)
    model = UniPerceiver(_cfg(PromptConfig(enabled=True, fc_prompt_out=3))).train()
    trainable = set(apply_trainable(model, RELEASE))
    batch, names = _classification_batch()
    out = run_task(model, batch, {"names": model.encode_targets(names)})
    out.loss.backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("override, message", [
    ("model.prompt.input_length=0", "input_length must be >= 1"),
    ("model.prompt.fc_prompt_out=-1", "fc_prompt_out must be >= 0"),
    ("model.prompt.similarity_weight=learned", "similarity_weight"),
    ("model.prompt.fc_prompt_tasks=[cls]", "fc_prompt_out is 0"),
    ("train.trainable=[]", "non-empty list"),
    ("model.prompt.lenght=3", "unknown config key 'model.prompt.lenght'"),
])
def test_prompt_config_is_validated(override, message):
    base = {"target_sets": {"n": {"kind": "class_names", "names": ["a"]}},
            "tasks": [{"name": "cls", "type": "image_classification", "target_set": "n"}]}
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, data=base, overrides=["model.prompt.enabled=true", override])


def test_fc_prompt_tasks_must_be_classification_tasks():
    base = {"target_sets": {"v": {"kind": "vocabulary"}},
            "tasks": [{"name": "mlm", "type": "text_mlm", "target_set": "v"}]}
    with pytest.raises(ConfigError, match="image/video classification only"):
        load_config(RunConfig, data=base, overrides=["model.prompt.enabled=true", "model.prompt.fc_prompt_out=4",
                                                     "model.prompt.fc_prompt_tasks=[mlm]"])
    with pytest.raises(ConfigError, match="not a task"):
        load_config(RunConfig, data=base, overrides=["model.prompt.enabled=true", "model.prompt.fc_prompt_out=4",
                                                     "model.prompt.fc_prompt_tasks=[nope]"])
    with pytest.raises(ConfigError, match="data-independent router"):
        from_dict(ModelConfig, {"moe": {"enabled": True, "routing": {"router": "token", "noise": "none"}},
                                "prompt": {"enabled": True}})


def test_single_task_retrieval_gathers_other_ranks_negatives_without_gradient():
    from uniperceiver.tasks.retrieval import retrieve

    torch.manual_seed(0)
    model = UniPerceiver(_cfg(moe=False)).eval()  # deterministic (no random temporal offset); grads still flow
    text = torch.tensor([[320, 786, 49407], [1237, 3255, 49407]])
    batch = TaskBatch("ret", "retrieval", "retrieve",
                      Sequence([Segment("image", torch.randn(2, 3, 32, 32))],
                               attributes_SA=task_attributes("image_retrieval")),
                      targets=Sequence([Segment("text", text)], attributes_SA=task_attributes("image_retrieval", "target")))
    others = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)  # two other ranks' batches
    seen = []

    def gather(feats):
        seen.append(feats.requires_grad)
        return others

    local = retrieve(model, batch)
    out = retrieve(model, batch, gather_negatives=gather)
    assert seen == [False, False]  # what goes to the other ranks carries no graph
    assert out.logits.shape == (2, 6) and torch.allclose(out.logits[:, :2], local.logits, atol=1e-6)
    assert float(out.losses["i2t"].detach()) > float(local.losses["i2t"].detach())  # more negatives, local block first
    out.loss.backward()
    assert model.predictor.proj.weight.grad is not None
