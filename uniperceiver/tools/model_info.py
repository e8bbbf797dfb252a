"""python -m uniperceiver.tools.model_info CONFIG [key=value ...]

Builds the model on the meta device (no memory, no time) and prints its parameter counts: total,
per top-level module, and for MoE configs the parameters active for one task, i.e. with each MoE
linear's experts merged into one copy (the release's "deployment" count). The last line is
`params_total=<int> params_active=<int>`.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from moe import MoELinear

from ..config import RunConfig, load_config, parse_cli
from ..modeling.model import UniPerceiver


def count_parameters(model: nn.Module) -> tuple[int, int, dict[str, int]]:
    """(total, active for one task, per top-level module).

    The frozen sin-cos spatial table is counted, as the release counts it (there it is a
    requires_grad=False parameter; here a buffer derived from the config).
    """
    frozen = {"embed": model.embed.spatial_pos.numel()} if hasattr(model, "embed") else {}
    total = sum(p.numel() for p in model.parameters()) + sum(frozen.values())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoELinear):
            per_expert = m.weight_EOI[0].numel() + (0 if m.bias_EO is None else m.bias_EO[0].numel())
            inactive += (m.weight_EOI.shape[0] - 1) * per_expert
    per_module = {name: sum(p.numel() for p in child.parameters()) + frozen.get(name, 0)
                  for name, child in model.named_children()}
    return total, total - inactive, per_module


def main(argv: list[str] | None = None) -> int:
    from .. import cli

    return cli.run(_model_info, argv, doc=__doc__, sections=("model",))


def _model_info(args: list[str]) -> int:
    path, overrides = parse_cli(args)
    cfg = load_config(RunConfig, path, overrides)
    with torch.device("meta"):
        model = UniPerceiver(cfg.model)
    total, active, per_module = count_parameters(model)
    m = cfg.model
    print(f"config: {path}  d_model={m.d_model} layers={m.num_layers} heads={m.num_heads} ffn={m.d_ffn} "
          f"moe={'on' if m.moe.enabled else 'off'}")
    for name, n in per_module.items():
        print(f"  {name:<10} {n:>14,}  ({n / 1e6:.2f}M)")
    print(f"  {'total':<10} {total:>14,}  ({total / 1e6:.2f}M)")
    if m.moe.enabled:
        print(f"  {'active':<10} {active:>14,}  ({active / 1e6:.2f}M, experts merged for one task)")
    print(f"params_total={total} params_active={active}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
