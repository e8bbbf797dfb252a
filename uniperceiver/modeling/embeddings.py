"""Modality tokenizers: text ids and image/video pixels -> D-wide tokens (OFFICIAL.md 1.2-1.3).

Shape legend: B batch, L text length, T frames, C channels, H/W pixels, G patch-grid side,
P patches per frame (G*G), D model width.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config.model import ModelConfig

SPE_ID = 49410


def sincos_2d_table(grid_size: int, dim: int, scale: float = 1.0) -> Tensor:
    """Fixed 2-D sin-cos table [G*G, D]: token n at row i = n // G, column j = n % G gets
    [sin(s i w), cos(s i w), sin(s j w), cos(s j w)] with w_k = 10000^(-k / (D/4)).

    `scale` s shrinks the grid coordinates so that a 14x14 grid at 224 px spans the same range
    as the 10x10 grid of 160-px pre-training (s = 160/224).
    """
    if dim % 4:
        raise ValueError(f"sin-cos table width {dim} must be divisible by 4")
    quarter = dim // 4
    omega_Q = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    coords = torch.arange(grid_size, dtype=torch.float64) * scale
    rows_P = coords.repeat_interleave(grid_size)  # i = n // G
    cols_P = coords.repeat(grid_size)  # j = n % G
    ri_PQ = rows_P[:, None] * omega_Q[None]
    cj_PQ = cols_P[:, None] * omega_Q[None]
    table = torch.cat([ri_PQ.sin(), ri_PQ.cos(), cj_PQ.sin(), cj_PQ.cos()], dim=1)
    return table.float()


class Embeddings(nn.Module):
    """Word, position and type tables for text; patches, sin-cos and temporal tables for
    pixels; one LayerNorm shared by both (the release's SHARE_LAYERNORM)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.word = nn.Embedding(cfg.vocab_size, d)
        self.text_pos = nn.Embedding(cfg.max_text_positions, d)
        self.text_type = nn.Embedding(cfg.type_vocab_size, d)
        self.patch = nn.Conv2d(cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.temporal_pos = nn.Embedding(cfg.max_frames, d)
        self.visual_type = nn.Embedding(1, d) if cfg.visual_type_embedding else None
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        # Prompt tuning: a learned bias on the word embedding of every <|spe|> token (zero start).
        self.s_token_bias = (
            nn.Parameter(torch.zeros(1, d)) if cfg.prompt.enabled and cfg.prompt.s_token_bias else None
        )
        # Frozen and derived from the config, so it is not part of the state dict.
        self.register_buffer(
            "spatial_pos", sincos_2d_table(cfg.grid_size, d, cfg.posembed_scale), persistent=False
        )

    # `normalize=False` returns the tokens before the shared LayerNorm, so a caller embedding
    # several sequences can normalise all their tokens in one call.

    def spe(self, batch_size: int, normalize: bool = True) -> Tensor:
        """[SPE] = LN(E_word[<|spe|>]) with no position or type embedding -> [B, 1, D]."""
        spe_D = self.word.weight[SPE_ID]
        if self.s_token_bias is not None:
            spe_D = spe_D + self.s_token_bias[0]
        if normalize:
            spe_D = self.norm(spe_D)
        return spe_D.expand(batch_size, 1, -1)

    def text(
        self, ids_BL: Tensor, positions: Tensor | None = None, check_positions: bool = True, normalize: bool = True
    ) -> Tensor:
        """LN(word + learned position + type 0); positions restart at 0 in every segment.
        `check_positions=False`: the caller has checked them (the static decoding step, which
        must not read a device value on the host)."""
        if positions is None:
            positions = torch.arange(ids_BL.shape[1], device=ids_BL.device)
        if check_positions and int(positions.max()) >= self.cfg.max_text_positions:
            raise ValueError(
                f"text position {int(positions.max())} >= max_text_positions={self.cfg.max_text_positions}"
            )
        word_BLD = self.word(ids_BL)
        if self.s_token_bias is not None:
            word_BLD = torch.where((ids_BL == SPE_ID)[..., None], word_BLD + self.s_token_bias[0], word_BLD)
        x_BLD = word_BLD + self.text_pos(positions) + self.text_type.weight[0]
        return self.norm(x_BLD) if normalize else x_BLD

    def visual(self, pixels_BTCHW: Tensor, temporal_offset: int | None = None, normalize: bool = True) -> Tensor:
        """Patchify every frame; tokens are frame-major, row-major inside a frame -> [B, T*P, D].

        In training the temporal ids are shifted by a random offset in [0, max_frames - T]
        drawn once per call (the release's POS_RANDOM); pass `temporal_offset` to fix it.
        """
        b, t, c, h, w = pixels_BTCHW.shape
        if t > self.cfg.max_frames:
            raise ValueError(f"{t} frames > max_frames={self.cfg.max_frames}")
        patches = self.patch(pixels_BTCHW.reshape(b * t, c, h, w).to(self.patch.weight.dtype))
        grid_h, grid_w = patches.shape[-2:]
        if grid_h * grid_w != self.spatial_pos.shape[0]:
            raise ValueError(
                f"{h}x{w} pixels give a {grid_h}x{grid_w} patch grid, but the model was built for "
                f"image_size={self.cfg.image_size} ({self.cfg.grid_size}x{self.cfg.grid_size})"
            )
        x_BTPD = patches.flatten(2).transpose(1, 2).reshape(b, t, grid_h * grid_w, -1)
        if temporal_offset is None:
            temporal_offset = 0
            if self.training and self.cfg.random_temporal_offset:
                temporal_offset = int(torch.randint(0, self.cfg.max_frames - t + 1, ()))
        frame_ids_T = torch.arange(t, device=x_BTPD.device) + temporal_offset
        x_BTPD = x_BTPD + self.spatial_pos[None, None] + self.temporal_pos(frame_ids_T)[None, :, None]
        if self.visual_type is not None:
            x_BTPD = x_BTPD + self.visual_type.weight[0]
        x_BLD = x_BTPD.reshape(b, t * grid_h * grid_w, -1)
        return self.norm(x_BLD) if normalize else x_BLD

