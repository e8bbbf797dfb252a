"""One encoder call per micro-step: the joint call equals separate passes (loss and every
gradient) for every task kind and every router, and runs every MoE sublayer exactly once."""
import pytest
import torch

from moe import MoEConfig, MoELinear
from uniperceiver.config import ModelConfig, ModelMoEConfig
from uniperceiver.engine.trainer import TrainStep
from uniperceiver.modeling.attributes import target_set_attributes, task_attributes
from uniperceiver.modeling.batch import Segment, Sequence, TargetSet, TaskBatch
from uniperceiver.modeling.model import UniPerceiver

ROUTERS = ["attribute", "task", "modality", "token", "context"]
KINDS = ["classification", "text_classification", "mlm", "caption", "retrieval"]


def _model(router: str, expert_type: str = "linear") -> UniPerceiver:
    torch.manual_seed(0)
    routing = MoEConfig(router=router, num_experts=4, top_k=2, num_tasks=5, noise="none", dropless=True,
                        expert_type=expert_type)
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=4, d_ffn=64, image_size=32, layer_scale_init=1.0,
                      drop_path=0.0, random_temporal_offset=False,
                      moe=ModelMoEConfig(enabled=True, layers="all", routing=routing))
    return UniPerceiver(cfg).train()


def _target_sets() -> dict[str, TargetSet]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(300, 3000, (5, 3), generator=g)
    ids[:, -1] = 49407
    pad = torch.zeros_like(ids, dtype=torch.bool)
    pad[1, 1:] = True
    classes = TargetSet("classes", ids, pad, target_set_attributes("class_names"), task_id=0)
    vocab = TargetSet("vocab", torch.tensor([[320, 49407], [786, 49407], [1237, 49407], [49407, 49407]]), None,
                      target_set_attributes("vocabulary"), task_id=2)
    return {"classes": classes, "vocab": vocab}


def _batch(kind: str) -> TaskBatch:
    g = torch.Generator().manual_seed(7)
    image = Segment("image", torch.randn(3, 3, 32, 32, generator=g))
    words = torch.tensor([[320, 786, 49407], [1237, 49407, 0], [555, 666, 49407]])
    pad = words == 0
    if kind == "classification":
        seq = Sequence([image], attributes_SA=task_attributes("image_classification")[:1], task_id=0)
        return TaskBatch("cls", kind, "img_cls", seq, labels=torch.tensor([0, 4, 2]), target_set="classes")
    if kind == "text_classification":
        text = torch.tensor([[320, 49410, 786, 49407], [1237, 49410, 49407, 0], [555, 666, 49410, 49407]])
        seq = Sequence([Segment("text", text, text == 0)], attributes_SA=task_attributes("text_classification")[:1],
                       task_id=1)
        return TaskBatch("tc", kind, "downstream", seq, labels=torch.tensor([1, 0, 3]), target_set="classes",
                         spe_index=torch.tensor([1, 1, 2]))
    if kind == "mlm":
        seq = Sequence([Segment("text", words, pad)], attributes_SA=target_set_attributes("vocabulary"), task_id=2)
        labels = torch.tensor([[0, -1, 3], [-1, 2, -1], [1, -1, -1]])
        return TaskBatch("mlm", kind, "mlm", seq, labels=labels, target_set="vocab")
    if kind == "caption":
        text = torch.cat([words, torch.full_like(words, 49410)], 1)
        seq = Sequence([image, Segment("text", text, torch.cat([pad, pad], 1), torch.arange(3).repeat(2))],
                       attributes_SA=task_attributes("image_caption"), task_id=3, caption_queries=True)
        return TaskBatch("cap", kind, "caption", seq, labels=torch.tensor([[0, 1, 3], [2, 3, -1], [1, 1, 3]]),
                         target_set="vocab")
    seq = Sequence([image], attributes_SA=task_attributes("image_retrieval")[:1], task_id=4)
    targets = Sequence([Segment("text", words, pad)], attributes_SA=task_attributes("image_retrieval", "target"),
                       task_id=4)
    return TaskBatch("ret", "retrieval", "retrieve", seq, targets=targets)


def _step(model, one_call: bool, kind: str):
    model.zero_grad(set_to_none=True)
    batch, sets = _batch(kind), _target_sets()
    calls = {}
    # MoE sublayers (routed linears; whole-FFN experts run as one block under fc1's router) and
    # every router.
    watched = [m for m in model.modules() if isinstance(m, MoELinear) or m in _routers(model)]
    hooks = [m.register_forward_hook(lambda mod, *_: calls.__setitem__(id(mod), calls.get(id(mod), 0) + 1))
             for m in watched]
    loss, _ = TrainStep(model, one_call)(batch, sets, set())
    for h in hooks:
        h.remove()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, calls


def _routers(model):
    return [m.router for m in model.modules() if isinstance(m, MoELinear) and m.router is not None]


def _compare(model, kind):
    loss_sep, grads_sep, calls_sep = _step(model, False, kind)
    loss_one, grads_one, calls_one = _step(model, True, kind)
    torch.testing.assert_close(loss_one, loss_sep, rtol=1e-5, atol=1e-6)
    assert grads_one.keys() == grads_sep.keys()
    for name, ref in grads_sep.items():
        # Summed gradients (type embedding, biases) cancel: relative to the tensor's scale.
        err = (grads_one[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
        assert err <= 1e-4, f"{kind}: {name}: max|diff|/max|ref| = {err:.2e}"
    # Every MoE sublayer ran exactly once in the joint call (separately: once per sequence batch).
    assert set(calls_one.values()) == {1} and {id(r) for r in _routers(model)} <= calls_one.keys()
    if model.cfg.moe.routing.expert_type == "linear":
        assert {id(m) for m in model.modules() if isinstance(m, MoELinear)} <= calls_one.keys()
    assert max(calls_sep.values()) > 1


@pytest.mark.parametrize("router", ROUTERS)
def test_one_call_equals_separate_passes_for_every_task_kind(router):
    model = _model(router)
    for kind in KINDS:
        _compare(model, kind)


@pytest.mark.parametrize("router", ["attribute", "token"])
def test_one_call_with_whole_ffn_experts(router):
    model = _model(router, expert_type="ffn")
    for kind in ("caption", "retrieval"):
        _compare(model, kind)
