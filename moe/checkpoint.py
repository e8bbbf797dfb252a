"""Expert checkpoints that store global expert ids, so they reload into any expert-parallel size.

Shape legend: E global experts, El local experts of one rank, P expert-parallel size.

A module's ordinary `state_dict()` holds only this rank's El experts under the usual keys
(`...weight_EOI`, `...bias_EO`). An expert shard (`expert_shard(model)`) records, for every
expert parameter, which GLOBAL experts its rows are. Any set of shards that together cover
experts 0..E-1 (written with P = 1, 2, 4, ...) can be loaded into a model sharded any other way
(`load_expert_shards`). Files: `save_expert_shard` / `load_expert_checkpoint` write and read
one `experts-rank{r}-of-{P}.pt` per expert-parallel rank in a directory.
"""
from __future__ import annotations

import glob
import os
from typing import Any

import torch
from torch import Tensor, nn

from .parallel import expert_modules

FORMAT = "moe-experts/v1"


def expert_shard(model: nn.Module) -> dict[str, Any]:
    """This rank's expert rows with their global ids: {"format", "ep_size", "ep_rank", "params"}."""
    params: dict[str, dict[str, Any]] = {}
    ep_size, ep_rank = 1, 0
    for prefix, module in expert_modules(model):
        ep = module.expert_parallel
        ep_size, ep_rank = ep.size, ep.rank
        for pname in module.EXPERT_PARAMS:
            param = getattr(module, pname, None)
            if param is None:
                continue
            params[f"{prefix}.{pname}" if prefix else pname] = {
                "num_experts": ep.num_experts,
                "global_ids": ep.global_ids(),
                "tensor": param.detach().cpu().clone(),
            }
    return {"format": FORMAT, "ep_size": ep_size, "ep_rank": ep_rank, "params": params}


def _rows_by_global_id(shards: list[dict[str, Any]], name: str) -> tuple[int, dict[int, Tensor]]:
    rows: dict[int, Tensor] = {}
    num_experts = None
    for shard in shards:
        if shard.get("format") != FORMAT:
            raise ValueError(f"not an expert shard (format {shard.get('format')!r}, expected {FORMAT!r})")
        entry = shard["params"].get(name)
        if entry is None:
            raise KeyError(f"expert parameter {name!r} missing from the shard of ep_rank {shard['ep_rank']}")
        if num_experts is not None and entry["num_experts"] != num_experts:
            raise ValueError(f"{name!r}: shards disagree on num_experts ({num_experts} vs {entry['num_experts']})")
        num_experts = entry["num_experts"]
        for row, gid in enumerate(entry["global_ids"]):
            rows[gid] = entry["tensor"][row]
    assert num_experts is not None
    return num_experts, rows


def load_expert_shards(model: nn.Module, shards: list[dict[str, Any]]) -> None:
    """Copy this rank's experts (by global id) out of shards written with any EP size."""
    if not shards:
        raise ValueError("no expert shards given")
    for prefix, module in expert_modules(model):
        ep = module.expert_parallel
        for pname in module.EXPERT_PARAMS:
            param = getattr(module, pname, None)
            if param is None:
                continue
            name = f"{prefix}.{pname}" if prefix else pname
            num_experts, rows = _rows_by_global_id(shards, name)
            if num_experts != ep.num_experts:
                raise ValueError(
                    f"expert checkpoint has {num_experts} experts for {name!r}, "
                    f"the model expects num_experts={ep.num_experts}"
                )
            missing = sorted(set(range(num_experts)) - set(rows))
            if missing:
                raise ValueError(f"{name!r}: the shards lack global experts {missing}")
            with torch.no_grad():
                for local, gid in enumerate(ep.global_ids()):
                    row = rows[gid]
                    if row.shape != param[local].shape:
                        raise ValueError(
                            f"{name!r} expert {gid}: checkpoint shape {tuple(row.shape)}, "
                            f"model shape {tuple(param[local].shape)}"
                        )
                    param[local].copy_(row)


def full_expert_state(shards: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Consolidate shards into one unsharded {name: E x ... tensor} (e.g. for export)."""
    names = shards[0]["params"].keys()
    out = {}
    for name in names:
        num_experts, rows = _rows_by_global_id(shards, name)
        out[name] = torch.stack([rows[e] for e in range(num_experts)])
    return out


def shard_path(directory: str, ep_rank: int, ep_size: int) -> str:
    return os.path.join(directory, f"experts-rank{ep_rank:05d}-of-{ep_size:05d}.pt")


def save_expert_shard(model: nn.Module, directory: str) -> str:
    """Write this rank's expert shard; every expert-parallel rank writes its own file."""
    shard = expert_shard(model)
    os.makedirs(directory, exist_ok=True)
    path = shard_path(directory, shard["ep_rank"], shard["ep_size"])
    tmp = path + ".tmp"
    torch.save(shard, tmp)
    os.replace(tmp, path)  # atomic: a reader never sees half a shard
    return path


def load_expert_checkpoint(model: nn.Module, directory: str) -> None:
    """Load experts from every shard file in `directory`, whatever EP size wrote them."""
    paths = sorted(glob.glob(os.path.join(directory, "experts-rank*-of-*.pt")))
    if not paths:
        raise FileNotFoundError(f"no expert shards (experts-rank*-of-*.pt) in {directory}")
    sizes = {os.path.basename(p).rsplit("-of-", 1)[1] for p in paths}
    if len(sizes) != 1:
        raise ValueError(f"{directory} mixes shards of several expert-parallel sizes: {sorted(sizes)}")
    shards = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    load_expert_shards(model, shards)
