"""Official Uni-Perceiver(-MoE) checkpoints -> this project's state dict (OFFICIAL.md 7).

Three source formats:
  official        the official training format: {'model': sd} or a bare sd, official key names,
                  MoE sublayers as `experts.deepspeed_experts.{e}` (7.1, 7.2)
  official-dense  the released dense model: nn.MultiheadAttention keys (7.3)
  deepspeed       the released MoE-base DeepSpeed file: weights under 'module', DS names (7.4)

Strict: every source key is either mapped, or dropped for a stated reason (a tensor the official
model holds but never uses); anything else, and every key the model expects but does not get,
fails the conversion with the full list.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..config.model import ModelConfig, ModelMoEConfig, PromptConfig
from ..modeling.embeddings import sincos_2d_table

SourceFormat = Literal["official", "official-dense", "deepspeed"]

# DeepSpeed names -> official names (plain substring replacement, in this order).
DS_RENAMES = (
    ("encoder.", "fused_encoder."),
    ("attention.self.qkv_proj", "self_attn.qkv_proj"),
    ("deepspeed_moe.gate", "gate"),
    ("deepspeed_moe.experts", "experts"),
    ("attention.output.dense", "self_attn.dense"),
    ("attention_output.residual_scale", "gamma_1"),
    ("ffn_output.residual_scale", "gamma_2"),
    ("ffn.dense.", "linear1."),
    ("ffn.dense2.", "linear2."),
    ("LayerNormModules.0.", "norm1."),
    ("LayerNormModules.1.", "norm2."),
    ("predictor.", "loss_prepare."),
)

_SUBLAYERS = {  # official sublayer name -> ours
    "self_attn.qkv_proj": "qkv",
    "self_attn.dense": "attn_out",
    "linear1": "fc1",
    "linear2": "fc2",
}
_DENSE_ATTN = {  # nn.MultiheadAttention names
    "self_attn.in_proj_weight": "qkv.weight",
    "self_attn.in_proj_bias": "qkv.bias",
    "self_attn.out_proj.weight": "attn_out.weight",
    "self_attn.out_proj.bias": "attn_out.bias",
}
_PLAIN = {
    "token_embed.embeddings.weight": "embed.word.weight",
    "token_embed.embeddings_norm.weight": "embed.norm.weight",
    "token_embed.embeddings_norm.bias": "embed.norm.bias",
    "token_embed.embeddings_pos.position_embeddings.weight": "embed.text_pos.weight",
    "token_embed.embeddings_token_type.weight": "embed.text_type.weight",
    "video_embed.embeddings.weight": "embed.patch.weight",
    "video_embed.embeddings.bias": "embed.patch.bias",
    "video_embed.embeddings_st_pos.temporal_pos_embed.weight": "embed.temporal_pos.weight",
    "loss_prepare.ln_post.weight": "predictor.ln_post.weight",
    "loss_prepare.ln_post.bias": "predictor.ln_post.bias",
    "loss_prepare.proj.weight": "predictor.proj.weight",
    "loss_prepare.proj.bias": "predictor.proj.bias",
}
# Prompt-tuning tensors (OFFICIAL.md 1.5): official name -> ours.
_PROMPT_PLAIN = {
    "s_token_bias": "embed.s_token_bias",
    "similarity_weight": "predictor.similarity_weight",
    "fc_prompt.weight": "predictor.fc_prompt.weight",
    "fc_prompt.bias": "predictor.fc_prompt.bias",
}
_DEEP_PROMPT = {  # per layer: official leaf -> ours
    "deep_prompt_embedding.embedding.weight": "deep_prompt_embedding.input_PD",
    "deep_prompt_embedding.target_embedding.weight": "deep_prompt_embedding.target_PD",
}
_SPATIAL = "video_embed.embeddings_st_pos.spatial_pos_embed.weight"
_VISUAL_TYPE = "video_embed.embeddings_type.weight"
_LAYER_RE = re.compile(r"^fused_encoder\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^(.+)\.experts\.deepspeed_experts\.(\d+)\.(weight|bias)$")
_GATE_RE = re.compile(r"^(.+)\.gate\.(.+)$")


@dataclass
class ConversionReport:
    dropped: list[str] = field(default_factory=list)  # "key: reason"
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"dropped {len(self.dropped)} unused official tensors:"] if self.dropped else []
        lines += [f"  {d}" for d in self.dropped]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class ConversionError(ValueError):
    pass


def unwrap_checkpoint(blob: object, fmt: SourceFormat, source: str) -> dict[str, Tensor]:
    """The raw state dict inside a checkpoint file of the given format."""
    if not isinstance(blob, dict):
        raise ConversionError(f"{source}: expected a dict, got {type(blob).__name__}")
    if fmt == "deepspeed":
        if "module" not in blob:
            raise ConversionError(
                f"{source}: a DeepSpeed file keeps its weights under 'module'; keys are {sorted(blob)[:12]}"
            )
        sd = blob["module"]
    else:
        sd = blob["model"] if "model" in blob and isinstance(blob["model"], dict) else blob
    tensors = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    if not tensors:
        raise ConversionError(f"{source}: no tensors found in the state dict")
    # DDP / fvcore prefixes
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}


def deepspeed_to_official(sd: dict[str, Tensor], report: ConversionReport) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith("visual_embed"):
            report.dropped.append(f"{key}: DeepSpeed-only visual embedding, unused (OFFICIAL.md 7.4)")
            continue
        new = key
        for old, rep in DS_RENAMES:
            new = new.replace(old, rep)
        if new.endswith(("gamma_1", "gamma_2")):
            value = value.reshape(-1)  # [1, 1, D] -> [D]
        out[new] = value.float() if value.is_floating_point() else value
    return out


def infer_model_config(sd: dict[str, Tensor], num_heads: int | None = None) -> ModelConfig:
    """Model sizes from official tensor shapes (heads cannot be seen: default d_model // 64)."""
    try:
        vocab, d = sd["token_embed.embeddings.weight"].shape
        patch = sd["video_embed.embeddings.weight"].shape[-1]
        in_ch = sd["video_embed.embeddings.weight"].shape[1]
        max_pos = sd["token_embed.embeddings_pos.position_embeddings.weight"].shape[0]
        type_vocab = sd["token_embed.embeddings_token_type.weight"].shape[0]
        max_frames = sd["video_embed.embeddings_st_pos.temporal_pos_embed.weight"].shape[0]
    except KeyError as exc:
        raise ConversionError(f"official state dict lacks {exc.args[0]!r}: is this a Uni-Perceiver checkpoint?") from None
    layer_ids = sorted({int(m.group(1)) for k in sd if (m := _LAYER_RE.match(k))})
    if not layer_ids:
        raise ConversionError("official state dict has no fused_encoder.layers.* tensors")
    num_layers = layer_ids[-1] + 1

    def ffn_width(i: int) -> int:
        for key in (f"fused_encoder.layers.{i}.linear1.weight",
                    f"fused_encoder.layers.{i}.linear1.experts.deepspeed_experts.0.weight"):
            if key in sd:
                return sd[key].shape[0]
        raise ConversionError(f"layer {i} has no linear1 weight")

    moe_layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER_RE.match(k)) and ".experts.deepspeed_experts." in k})
    moe = ModelMoEConfig()
    if moe_layers:
        subs = sorted({_SUBLAYERS[m.group(1)] for k in sd
                       if (lm := _LAYER_RE.match(k)) and (m := _EXPERT_RE.match(lm.group(2)))})
        experts = 1 + max(int(m.group(2)) for k in sd
                          if (lm := _LAYER_RE.match(k)) and (m := _EXPERT_RE.match(lm.group(2))))
        attribute_key = next(k for k in sd if k.endswith("gate.tag_transform.0.weight"))
        routing = dict(num_experts=experts, top_k=min(2, experts), attribute_dim=sd[attribute_key].shape[1])
        from moe import MoEConfig

        moe = ModelMoEConfig(
            enabled=True,
            layers="all",
            layer_ids=moe_layers,
            sublayers=[s for s in ("qkv", "attn_out", "fc1", "fc2") if s in subs],
            routing=MoEConfig(**routing),
        )
        if moe_layers == list(range(0, num_layers, 2)):
            moe.layers, moe.layer_ids = "even", None
    prompt = infer_prompt_config(sd, layer_ids[0])
    grid = int(round(math.sqrt(sd[_SPATIAL].shape[0]))) if _SPATIAL in sd else 14
    scale = _fit_sincos_scale(sd[_SPATIAL], grid) if _SPATIAL in sd else 1.0
    gamma_key = f"fused_encoder.layers.{layer_ids[0]}.gamma_1"
    return ModelConfig(
        d_model=d,
        num_layers=num_layers,
        num_heads=num_heads if num_heads is not None else max(1, d // 64),
        d_ffn=ffn_width(0),
        vocab_size=vocab,
        max_text_positions=max_pos,
        type_vocab_size=type_vocab,
        image_size=grid * patch,
        patch_size=patch,
        in_channels=in_ch,
        posembed_scale=scale,
        max_frames=max_frames,
        layer_scale_init=1e-3 if gamma_key in sd else None,
        temperatures=sorted(k[len("loss_prepare.logit_scale_"):] for k in sd if k.startswith("loss_prepare.logit_scale_")),
        moe=moe,
        prompt=prompt,
    )


def infer_prompt_config(sd: dict[str, Tensor], first_layer: int) -> PromptConfig:
    """Prompt-tuning switches from the tensors a prompt-tuned official model holds: deep prompt
    lengths and sharing from the per-layer tables, the FC prompt from its Linear, a learned
    similarity weight from its scalar (absent = the release's fixed 'zero')."""
    deep_key = f"fused_encoder.layers.{first_layer}.deep_prompt_embedding.embedding.weight"
    target_key = f"fused_encoder.layers.{first_layer}.deep_prompt_embedding.target_embedding.weight"
    has_any = ("s_token_bias" in sd or "fc_prompt.weight" in sd or deep_key in sd)
    if not has_any:
        return PromptConfig()
    fc_out = sd["fc_prompt.weight"].shape[0] if "fc_prompt.weight" in sd else 0
    return PromptConfig(
        enabled=True,
        s_token_bias="s_token_bias" in sd,
        deep_prompt=deep_key in sd,
        input_length=sd[deep_key].shape[0] if deep_key in sd else 10,
        shared=target_key not in sd,
        target_length=sd[target_key].shape[0] if target_key in sd else 10,
        fc_prompt_out=fc_out,
        similarity_weight="learn" if "similarity_weight" in sd or not fc_out else "fixed",
        similarity_weight_value=1.0 if "similarity_weight" in sd or not fc_out else 0.0,
    )


def _fit_sincos_scale(table_PD: Tensor, grid: int) -> float:
    """The grid-coordinate scale s of a release sin-cos table: token 1 (row 0, column 1) holds
    sin(s) and cos(s) at the first column of its third and fourth quarters."""
    d = table_PD.shape[1]
    s = math.atan2(float(table_PD[1, d // 2]), float(table_PD[1, 3 * d // 4]))
    for nice in (1.0, 160 / 224):  # snap to the release's scales when they fit
        if abs(s - nice) < 1e-5:
            return nice
    return s


def official_to_ours(
    sd: dict[str, Tensor],
    cfg: ModelConfig,
    expected: dict[str, Tensor],
    *,
    fold_visual_type: bool = False,
    report: ConversionReport | None = None,
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Map official keys onto the keys (and shapes) of `expected` (a model's state_dict)."""
    report = report or ConversionReport()
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    experts: dict[str, dict[int, Tensor]] = {}
    visual_type: Tensor | None = None

    for key, value in sd.items():
        if key in _PLAIN:
            out[_PLAIN[key]] = value
        elif key in _PROMPT_PLAIN:
            out[_PROMPT_PLAIN[key]] = value.reshape(()) if key == "similarity_weight" else value
        elif key == "token_embed.s_token_bias":
            if "s_token_bias" in sd and not torch.equal(sd["s_token_bias"], value):
                raise ConversionError(f"{key} differs from s_token_bias, but the release shares this tensor")
            report.dropped.append(f"{key}: second name of s_token_bias")
        elif key.startswith("video_embed.embeddings_norm."):
            twin = key.replace("video_embed", "token_embed")
            if twin in sd and not torch.equal(sd[twin], value):
                raise ConversionError(f"{key} differs from {twin}, but the release shares this LayerNorm")
            report.dropped.append(f"{key}: second name of the shared embedding LayerNorm")
        elif key == _SPATIAL:
            ours = sincos_2d_table(cfg.grid_size, cfg.d_model, cfg.posembed_scale)
            if value.shape == ours.shape and torch.allclose(value.float(), ours, atol=1e-5):
                report.dropped.append(f"{key}: frozen sin-cos table, recomputed from the config (matches)")
            else:
                report.dropped.append(f"{key}: frozen sin-cos table {tuple(value.shape)}, recomputed for "
                                      f"{cfg.grid_size}x{cfg.grid_size} at scale {cfg.posembed_scale:.6g}")
                report.notes.append("the spatial table differs from the checkpoint's (other resolution or scale)")
        elif key == _VISUAL_TYPE:
            if cfg.visual_type_embedding:
                out["embed.visual_type.weight"] = value
            elif fold_visual_type:
                visual_type = value
                report.notes.append(f"{key} folded into embed.patch.bias")
            else:
                report.dropped.append(f"{key}: visual type embedding, never added (ADD_TYPE_EMBED off)")
        elif key.startswith("loss_prepare.logit_scale_"):
            out[f"predictor.logit_scale.{key[len('loss_prepare.logit_scale_'):]}"] = value.reshape(())
        elif m := _LAYER_RE.match(key):
            layer, rest = m.group(1), m.group(2)
            prefix = f"encoder.layers.{layer}."
            if rest in ("gamma_1", "gamma_2") or rest.startswith(("norm1.", "norm2.")):
                out[prefix + rest] = value
            elif rest in _DEEP_PROMPT:
                out[prefix + _DEEP_PROMPT[rest]] = value
            elif rest in _DENSE_ATTN:
                out[prefix + _DENSE_ATTN[rest]] = value
            elif em := _EXPERT_RE.match(rest):
                sub = _SUBLAYERS.get(em.group(1))
                if sub is None:
                    unexpected.append(key)
                    continue
                experts.setdefault(f"{prefix}{sub}.{em.group(3)}", {})[int(em.group(2))] = value
            elif gm := _GATE_RE.match(rest):
                sub = _SUBLAYERS.get(gm.group(1))
                target = f"{prefix}{sub}.router.{gm.group(2)}"
                if sub is not None and target in expected:
                    out[target] = value
                elif sub in ("attn_out", "fc2") and cfg.moe.share_decisions:
                    report.dropped.append(
                        f"{key}: gate of a sublayer that reuses the {'qkv' if sub == 'attn_out' else 'fc1'} decision (never used)"
                    )
                else:
                    unexpected.append(key)
            else:
                sub_name, _, leaf = rest.rpartition(".")
                if sub_name in _SUBLAYERS and leaf in ("weight", "bias"):
                    out[f"{prefix}{_SUBLAYERS[sub_name]}.{leaf}"] = value
                else:
                    unexpected.append(key)
        else:
            unexpected.append(key)

    for base, per_expert in experts.items():
        ids = sorted(per_expert)
        if ids != list(range(len(ids))):
            raise ConversionError(f"{base}: expert ids {ids} are not 0..{len(ids) - 1}")
        suffix = "weight_EOI" if base.endswith(".weight") else "bias_EO"
        out[base.rsplit(".", 1)[0] + "." + suffix] = torch.stack([per_expert[e] for e in ids])

    if visual_type is not None and "embed.patch.bias" in out:
        # The DeepSpeed model added this embedding to every visual token: same as a bias shift.
        out["embed.patch.bias"] = out["embed.patch.bias"] + visual_type[0]

    missing = sorted(set(expected) - set(out))
    extra = sorted(set(out) - set(expected))
    shapes = sorted(
        f"{k}: converted {tuple(out[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(out) & set(expected) if tuple(out[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    for title, items in (("unexpected official keys", unexpected), ("missing model keys", missing),
                         ("keys with no place in the model", extra), ("shape mismatches", shapes)):
        if items:
            problems.append(f"{title} ({len(items)}):\n" + "\n".join(f"    {i}" for i in items[:40])
                            + (f"\n    ... and {len(items) - 40} more" if len(items) > 40 else ""))
    if problems:
        raise ConversionError("conversion failed:\n  " + "\n  ".join(problems))
    return {k: out[k].to(expected[k].dtype).contiguous() for k in expected}, report
