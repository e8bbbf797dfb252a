"""Model FLOPs of the shared encoder and model FLOPs utilisation (MFU).

Shape legend: B sequences, L tokens per sequence, D width, F FFN width, N layers.

Model FLOPs count the arithmetic the model needs, not what an implementation happens to run
(no recomputation, no padded capacity slots), with a multiply-add as 2 FLOPs (PaLM's MFU):
per token and layer, the four linears cost 2 (3D.D + D.D + D.F + F.D) = 2 (4D^2 + 2DF), and
attention 2 (2 L D) for the scores and the weighted sum over L keys. MoE sublayers:
attribute/task/modality routing runs one merged linear per segment (dense cost; merging K
experts' weights is K.O.I per segment, counted too), token/context routing runs K experts per
token (K times the sublayer). Backward costs twice the forward, so a training step is 3x.
`mfu` divides by the card's dense peak (`peak_flops`): bf16/fp16 tensor cores, or TF32 when
float32 matmuls may use them, else plain FP32.
"""
from __future__ import annotations

import torch

from ..config.model import ModelConfig

# Dense (non-sparse) peak FLOP/s per device name fragment: (bf16/fp16, tf32, fp32).
PEAK_FLOPS: dict[str, tuple[float, float, float]] = {
    "H200": (989e12, 494e12, 67e12),
    "H100 SXM": (989e12, 494e12, 67e12),
    "H100 NVL": (835e12, 418e12, 60e12),
    "H100 PCIe": (756e12, 378e12, 51e12),
    "H100": (989e12, 494e12, 67e12),
    "H800": (989e12, 494e12, 67e12),
    "GH200": (989e12, 494e12, 67e12),
    "B200": (2250e12, 1100e12, 80e12),
    "A100": (312e12, 156e12, 19.5e12),
    "A800": (312e12, 156e12, 19.5e12),
    "L40S": (362e12, 183e12, 91.6e12),
    "A10G": (70e12, 35e12, 31.2e12),
    "V100": (125e12, 125e12, 15.7e12),
}


def layer_flops_per_token(cfg: ModelConfig, layer_idx: int, seq_len: int, num_segments: int = 1,
                          tokens: int = 1) -> float:
    """Forward FLOPs of one encoder layer per token of a length-`seq_len` sequence."""
    d, f = cfg.d_model, cfg.d_ffn
    shapes = {"qkv": (d, 3 * d), "attn_out": (d, d), "fc1": (d, f), "fc2": (f, d)}
    moe = cfg.moe
    routed = moe.enabled and layer_idx in moe.layer_indices(cfg.num_layers)
    flops = 2.0 * 2 * seq_len * d  # scores q.k over L keys, then the weighted sum of L values
    for name, (n_in, n_out) in shapes.items():
        linear = 2.0 * n_in * n_out
        if routed and name in moe.sublayers:
            routing = moe.routing
            if routing.data_independent and routing.expert_type == "linear":
                # one merged linear; the merge itself (K weights per segment) spread over the tokens
                linear += 2.0 * routing.top_k * n_in * n_out * num_segments / max(tokens, 1)
            else:
                linear *= routing.top_k
        flops += linear
    return flops


def encoder_flops(cfg: ModelConfig, batch: int, seq_len: int, num_segments: int = 1,
                  training: bool = True) -> float:
    """FLOPs of one encoder call on `batch` sequences of `seq_len` tokens (x3 for training)."""
    tokens = batch * seq_len
    per_token = sum(layer_flops_per_token(cfg, i, seq_len, num_segments, tokens) for i in range(cfg.num_layers))
    return per_token * tokens * (3.0 if training else 1.0)


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """The card's dense peak FLOP/s for `dtype` matmuls, or None when unknown (CPU, unlisted GPU)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # most specific name first
        if key in name:
            bf16, tf32, fp32 = PEAK_FLOPS[key]
            if dtype in (torch.bfloat16, torch.float16):
                return bf16
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    return None


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (None when the peak is unknown)."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / peak
