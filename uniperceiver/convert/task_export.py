"""Per-task dense export: a data-independent router's decisions for one task are fixed by the
task's attribute rows, so every MoE sublayer can hold one merged weight set per row instead of
its experts and gate (OFFICIAL.md 2.3, "deployment" parameter count).

The exported model routes with `moe`'s parameter-free lookup router: attribute row r -> weight
set r with gate 1, so its outputs on the task equal the MoE model's (the merged weights are
computed by the same code, bit for bit). Rows the task never produces are refused at run time.
"""
from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch import Tensor

from moe import MoELinear, RoutingContext
from moe.config import TOKEN_ROUTERS

from ..modeling.attributes import target_set_attributes
from ..modeling.model import UniPerceiver
from ..utils.errors import BadInput
from ..utils.task_registry import task_spec

_SIBLING = {"attn_out": "qkv", "fc2": "fc1"}  # sublayers that reuse a sibling's decision


class ExportError(ValueError, BadInput):
    pass


def task_rows(task_type: str) -> Tensor:
    """The distinct attribute rows [R, A] a task type routes with (its `TaskSpec`): the rows of
    its input and per-sample target sequences, and those of the shared target sets it is scored
    against."""
    try:
        spec = task_spec(task_type)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    rows = [torch.tensor(spec.attribute_rows(role), dtype=torch.float32) for role in sorted(spec.attributes)]
    rows += [target_set_attributes(kind) for kind in spec.target_sets]
    unique: list[Tensor] = []
    for row in torch.cat(rows):
        if not any(torch.equal(row, u) for u in unique):
            unique.append(row)
    return torch.stack(unique)


def export_task(model: UniPerceiver, task_type: str) -> UniPerceiver:
    """A model with one merged weight set per attribute row of `task_type` in every MoE
    sublayer, no gates and no unused experts."""
    cfg = model.cfg
    routing = cfg.moe.routing
    if not cfg.moe.enabled:
        raise ExportError("the model has no MoE layers: it is already dense")
    if routing.router in TOKEN_ROUTERS:
        raise ExportError(f"router {routing.router!r} depends on the tokens: a task's decisions are not fixed, "
                          "so its experts cannot be merged once")
    if routing.router != "attribute":
        raise ExportError(f"per-task export supports the attribute router (the release's), not {routing.router!r}")
    rows_RA = task_rows(task_type)
    num_rows = rows_RA.shape[0]
    lookup = replace(routing, router="lookup", num_experts=num_rows, top_k=1, noise="none",
                     lookup_rows=rows_RA.tolist(), load_balance_weight=0.0, z_loss_weight=0.0)
    out_cfg = replace(cfg, moe=replace(cfg.moe, routing=lookup))
    with torch.device("meta"):
        expected = UniPerceiver(out_cfg).state_dict()
    ctx = RoutingContext(segment_starts=tuple(range(num_rows)), attributes_SA=rows_RA)
    source = model.state_dict()
    state = {k: v for k, v in source.items() if k in expected}
    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()  # no gate noise: the decisions inference takes
    try:
        with torch.no_grad():
            for name, module in modules.items():
                if not isinstance(module, MoELinear):
                    continue
                router_owner = module
                if module.router is None:
                    stem, _, sub = name.rpartition(".")
                    router_owner = modules[f"{stem}.{_SIBLING[sub]}"]
                decision = router_owner.route(ctx)
                weight_ROI, bias_RO = module.merged_weights(decision)
                state[f"{name}.weight_EOI"] = weight_ROI.clone()
                if bias_RO is not None:
                    state[f"{name}.bias_EO"] = bias_RO.clone()
    finally:
        model.train(was_training)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ExportError(f"export left model keys unfilled: {missing[:10]}")
    exported = UniPerceiver(out_cfg)
    exported.load_state_dict({k: state[k] for k in expected}, strict=True)
    return exported.eval()


def export_task_file(src: str | os.PathLike, dst: str | os.PathLike, task_type: str) -> tuple[int, int, int]:
    """Read our model file `src`, write the task model to `dst`; returns (MoE parameters, task
    model parameters, weight sets per MoE sublayer)."""
    task_rows(task_type)  # an unknown task type fails before the model is read
    model = UniPerceiver.from_pretrained(src)
    try:
        exported = export_task(model, task_type)
    except ExportError as exc:
        raise ExportError(f"{src}: {exc}") from None
    exported.save_pretrained(dst)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return count(model), count(exported), exported.cfg.moe.routing.num_experts
