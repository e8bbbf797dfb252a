"""Typed model configuration (the `model:` section of a run config).

Defaults are Uni-Perceiver base at 224 px (OFFICIAL.md section 1); `configs/model/*.yaml` derive
the tiny/base/large, dense/MoE variants from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moe import MoEConfig

MoESublayer = Literal["qkv", "attn_out", "fc1", "fc2"]

# Every temperature the released predictor holds (OFFICIAL.md 3.2); tasks pick one by name.
TEMPERATURE_NAMES = (
    "img_cls",
    "video_cls",
    "text_mlm",
    "text_caption",
    "caption",
    "mlm",
    "retrieve",
    "tqa_mlm",
    "tqa_caption",
    "tqa_retrieve",
    "downstream",
)


@dataclass
class ModelMoEConfig:
    """Where the conditional-MoE sublayers sit and how they route."""

    enabled: bool = False
    # "even": layers 0, 2, 4, ... (the release, whose config calls this 'odd'); "odd": 1, 3, ...;
    # "all"; "every4": 0, 4, 8, ...; or an explicit list in `layer_ids`.
    layers: Literal["even", "odd", "all", "every4"] = "even"
    layer_ids: list[int] | None = None
    sublayers: list[MoESublayer] = field(
        default_factory=lambda: ["qkv", "attn_out", "fc1", "fc2"]
    )
    # attn_out reuses qkv's decision and fc2 reuses fc1's (the release): 2 decisions per layer.
    share_decisions: bool = True
    routing: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        if len(set(self.sublayers)) != len(self.sublayers):
            raise ValueError(f"sublayers has duplicates: {self.sublayers}")
        if self.share_decisions:
            for child, parent in (("attn_out", "qkv"), ("fc2", "fc1")):
                if child in self.sublayers and parent not in self.sublayers:
                    raise ValueError(
                        f"share_decisions: '{child}' reuses the decision of '{parent}', "
                        f"which is not in sublayers {self.sublayers}"
                    )
        if self.enabled and not self.sublayers:
            raise ValueError("enabled MoE needs at least one sublayer")
        if self.enabled and self.routing.expert_type == "ffn":
            # Whole-FFN experts replace fc1 -> act -> fc2 as one routed block (one decision);
            # routed attention sublayers stay linear experts.
            if not {"fc1", "fc2"} <= set(self.sublayers) or not self.share_decisions:
                raise ValueError(
                    "model.moe.routing.expert_type=ffn needs fc1 and fc2 in model.moe.sublayers and "
                    f"model.moe.share_decisions=true (got sublayers={self.sublayers}, "
                    f"share_decisions={self.share_decisions})"
                )

    def layer_indices(self, num_layers: int) -> list[int]:
        if not self.enabled:
            return []
        if self.layer_ids is not None:
            bad = [i for i in self.layer_ids if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"moe.layer_ids {bad} outside 0..{num_layers - 1}")
            return sorted(set(self.layer_ids))
        step, start = {"even": (2, 0), "odd": (2, 1), "all": (1, 0), "every4": (4, 0)}[self.layers]
        return list(range(start, num_layers, step))


# The release's PROMPT_PARAM (OFFICIAL.md 1.5): with prompt tuning on, a parameter trains iff its
# name contains one of these substrings (our names keep these words where the release has them).
RELEASE_PROMPT_TRAINABLE = (
    "s_token_bias",
    "norm",
    "prompt_embed",
    "deep_prompt_embedding",
    "fc_prompt",
    "similarity_weight",
    "ln_post",
)


@dataclass
class PromptConfig:
    """Prompt tuning as the release does it (OFFICIAL.md 1.5; shared/reference/official_prompt).

    Off by default: nothing is built and the model is the plain one.
    """

    enabled: bool = False
    # A learned [1, D] bias added to the word embedding of every <|spe|> token (the [SPE] prefix,
    # MLM masks, caption queries) before position, type and LayerNorm.
    s_token_bias: bool = True
    # Deep prompts: per layer, learned key/value tokens passed through that layer's norm1 and
    # prepended to the keys and values only (never masked, no position/type embedding).
    deep_prompt: bool = True
    input_length: int = 10
    # shared: targets (class names, vocabulary, retrieval captions) use the input prompts;
    # otherwise each layer also holds target prompts of `target_length` tokens.
    shared: bool = True
    target_length: int = 10
    # FC prompt: logit = similarity_weight * logit + fc_prompt(feature) for classification, on the
    # projected feature before L2 normalisation; 0 = off. Its Linear starts at zero.
    fc_prompt_out: int = 0
    # Classification tasks (by name) that get the FC prompt; empty = every classification task.
    fc_prompt_tasks: list[str] = field(default_factory=list)
    # "learn": a scalar parameter starting at `similarity_weight_value`; "fixed": the constant
    # (the release's 'zero' is fixed at 0.0).
    similarity_weight: Literal["learn", "fixed"] = "learn"
    similarity_weight_value: float = 1.0

    def __post_init__(self) -> None:
        for name in ("input_length", "target_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"prompt.{name} must be >= 1, got {getattr(self, name)}")
        if self.fc_prompt_out < 0:
            raise ValueError(f"prompt.fc_prompt_out must be >= 0 (0 = off), got {self.fc_prompt_out}")
        if self.fc_prompt_tasks and not self.fc_prompt_out:
            raise ValueError("prompt.fc_prompt_tasks is set but prompt.fc_prompt_out is 0 (FC prompt off)")

    @property
    def deep(self) -> bool:
        return self.enabled and self.deep_prompt

    @property
    def separate_target(self) -> bool:
        return self.deep and not self.shared

    @property
    def fc(self) -> bool:
        return self.enabled and self.fc_prompt_out > 0


@dataclass
class ModelConfig:
    """The shared encoder, its modality tokenizers and the similarity predictor."""

    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    d_ffn: int = 3072
    vocab_size: int = 49411
    max_text_positions: int = 512
    type_vocab_size: int = 2
    # Visual tokenizer: 16x16 conv patches, frozen 2-D sin-cos spatial table whose grid
    # coordinates are multiplied by posembed_scale (160/224 at 224 px after 160-px pre-training),
    # learned temporal table over max_frames.
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    posembed_scale: float = 1.0
    max_frames: int = 8
    # Training draws a temporal offset in [0, max_frames - T] once per forward (the release).
    random_temporal_offset: bool = True
    # The released checkpoints never add the visual type embedding (ADD_TYPE_EMBED off);
    # the converter can fold it into the patch bias instead.
    visual_type_embedding: bool = False
    layer_norm_eps: float = 1e-5
    layer_scale_init: float | None = 1e-3
    drop_path: float = 0.1
    temperature_init: float = 0.07
    temperature_cap: float = 100.0
    temperatures: list[str] = field(default_factory=lambda: list(TEMPERATURE_NAMES))
    moe: ModelMoEConfig = field(default_factory=ModelMoEConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        if self.d_model % 4:
            raise ValueError(f"d_model={self.d_model} must be divisible by 4 (2-D sin-cos table)")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.vocab_size < 49411:
            # Smaller vocabularies cannot hold the CLIP specials (<|spe|> = 49410).
            raise ValueError(f"vocab_size must be >= 49411 (CLIP BPE + specials), got {self.vocab_size}")
        if len(set(self.temperatures)) != len(self.temperatures):
            raise ValueError(f"temperatures has duplicates: {self.temperatures}")
        self.moe.layer_indices(self.num_layers)  # validates layer_ids
        if self.prompt.deep and self.moe.enabled and not self.moe.routing.data_independent:
            # The prompt keys/values would need their own token routing decisions.
            raise ValueError(
                f"prompt.deep_prompt needs a data-independent router, not moe.routing.router="
                f"{self.moe.routing.router!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size
