"""`UniPerceiver`: one shared encoder for inputs and candidate targets, and the similarity predictor.

Shape legend: B batch, L sequence length (with [SPE]), D model width, N target candidates,
S routing segments, H heads, M cached key/value length.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor, nn

from moe import RoutingContext

from ..config.model import ModelConfig
from .batch import Sequence, TargetSet
from .embeddings import Embeddings
from .encoder import Decision, Encoder, EncoderOutput, LayerCache, SequenceGroup, init_weights_like_release
from .predictor import Predictor

CHECKPOINT_FORMAT = "uniperceiver-moe/v1"


@dataclass
class JointEncoding:
    """What one joint encoder call returns: per sequence its hidden states (their `decisions`
    are empty), and the routing decisions of the call (every routed sublayer once)."""

    outputs: list[EncoderOutput]
    decisions: list[tuple[str, Decision]]
    segment_tokens: list[int]  # tokens of every routing segment of the call, in order


class UniPerceiver(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.predictor = Predictor(cfg)
        init_weights_like_release(self)
        if self.predictor.fc_prompt is not None:
            # The release zero-initialises the FC prompt after its generic init: training
            # starts from the plain similarity logits (times the similarity weight).
            nn.init.zeros_(self.predictor.fc_prompt.weight)
            nn.init.zeros_(self.predictor.fc_prompt.bias)

    # ----------------------------------------------------------------------------- sequences
    def embed_sequence(
        self, seq: Sequence, temporal_offsets: list[int] | None = None, normalize: bool = True
    ) -> tuple[Tensor, Tensor | None, list[int]]:
        """`[SPE] + segments` -> tokens [B, L, D], key padding [B, L] (True = pad, None when
        nothing is padded) and the length of every piece ([SPE] first). `normalize=False`:
        before the embeddings' shared LayerNorm (applied per token, so a joint call applies
        it once to every sequence's tokens)."""
        b = seq.batch_size
        pieces, pads, lengths = [self.embed.spe(b, normalize)], [], [1]
        visual_calls = 0
        for seg in seq.segments:
            if seg.modality == "text":
                x = self.embed.text(seg.data, seg.positions, normalize=normalize)
                pad = seg.padding_mask
            else:
                offset = None if temporal_offsets is None else temporal_offsets[visual_calls]
                visual_calls += 1
                x = self.embed.visual(seg.data, offset, normalize=normalize)
                pad = None
            pieces.append(x)
            pads.append(pad)
            lengths.append(x.shape[1])
        x_BLD = torch.cat(pieces, dim=1)
        pad_BL = None
        if any(p is not None for p in pads):
            parts = [torch.zeros(b, 1, dtype=torch.bool, device=x_BLD.device)]
            for p, n in zip(pads, lengths[1:]):
                parts.append(torch.zeros(b, n, dtype=torch.bool, device=x_BLD.device) if p is None else p.bool())
            pad_BL = torch.cat(parts, dim=1)
        return x_BLD, pad_BL, lengths

    def routing_context(self, seq: Sequence, lengths: list[int]) -> RoutingContext:
        """One routing row per segment; [SPE] is routed with the first segment (the release
        splits at data_cum_length[1] = 1 + L_1)."""
        num_rows = seq.attributes_SA.shape[0] if seq.attributes_SA is not None else len(seq.segments)
        if num_rows == 1:
            starts: tuple[int, ...] = (0,)
            modality_ids_S = seq.modality_ids_S[:1]
        else:
            ends = list(accumulate([lengths[0] + lengths[1]] + lengths[2:]))
            starts = (0, *ends[:-1])
            modality_ids_S = seq.modality_ids_S
        device = self.embed.word.weight.device
        return RoutingContext(
            segment_starts=starts,
            attributes_SA=None if seq.attributes_SA is None else seq.attributes_SA.to(device),
            task_ids_S=torch.full((num_rows,), seq.task_id, dtype=torch.long, device=device),
            modality_ids_S=modality_ids_S.to(device),
        )

    @staticmethod
    def attention_mask(
        seq: Sequence, pad_BL: Tensor | None, lengths: list[int]
    ) -> Tensor | None:
        """Bool [B|1, 1, L, L] (True = may attend), or None when everything sees everything.

        Caption training (`seq.caption_queries`) uses the structured mask of OFFICIAL.md 1.4 over
        [SPE | visual | words w_0..w_{T-1} | queries q_0..q_{T-1}]: everyone sees the prefix; the
        prefix sees only itself; word i sees words <= i; query i sees words < i and itself.
        """
        allowed = None
        if seq.caption_queries:
            total = sum(lengths)
            t = lengths[-1] // 2
            prefix = total - 2 * t
            device = seq.segments[0].data.device
            allowed_LL = torch.zeros(total, total, dtype=torch.bool, device=device)
            allowed_LL[:, :prefix] = True
            causal_TT = torch.ones(t, t, dtype=torch.bool, device=device).tril()
            w0, q0 = prefix, prefix + t
            allowed_LL[w0:q0, w0:q0] = causal_TT
            allowed_LL[q0:, w0:q0] = causal_TT.tril(-1)
            allowed_LL[q0:, q0:] = torch.eye(t, dtype=torch.bool, device=device)
            allowed = allowed_LL[None, None]
        if pad_BL is not None:
            keys_B11L = ~pad_BL[:, None, None, :]
            allowed = keys_B11L if allowed is None else allowed & keys_B11L
        return allowed

    def encode(
        self,
        seq: Sequence,
        *,
        temporal_offsets: list[int] | None = None,
        keep_kv: bool = False,
    ) -> EncoderOutput:
        """Run `[SPE] + segments` through the shared encoder -> hidden states [B, L, D]."""
        x_BLD, pad_BL, lengths = self.embed_sequence(seq, temporal_offsets)
        ctx = self.routing_context(seq, lengths)
        ctx.padding_mask_BL = pad_BL  # token/context routers neither route nor count padding
        allowed = self.attention_mask(seq, pad_BL, lengths)
        return self.encoder(x_BLD, ctx, allowed, keep_kv=keep_kv, role=seq.role)

    def encode_many(
        self, seqs: list[Sequence], temporal_offsets: list[list[int] | None] | None = None
    ) -> JointEncoding:
        """Encode several sequence batches in ONE encoder call (each keeps its own length and
        attention mask; the embedding norm, layer norms and every MoE/FFN sublayer run once over
        all their tokens). Equals `encode` per sequence up to float rounding (token routers
        with a capacity budget it over the joint tokens)."""
        groups, sizes = [], []
        offsets = temporal_offsets or [None] * len(seqs)
        for seq, offset in zip(seqs, offsets):
            x_BLD, pad_BL, lengths = self.embed_sequence(seq, offset, normalize=False)
            ctx = self.routing_context(seq, lengths)
            ctx.padding_mask_BL = pad_BL
            groups.append(SequenceGroup(x_BLD, ctx, self.attention_mask(seq, pad_BL, lengths), role=seq.role))
            sizes.append(x_BLD.shape[0] * x_BLD.shape[1])
        # The embeddings' LayerNorm once over every token of every sequence.
        raw_TD = torch.cat([g.x_BLD.reshape(-1, g.x_BLD.shape[-1]) for g in groups])
        normed = self.embed.norm(raw_TD).split(sizes)
        for g, x_TD in zip(groups, normed):
            g.x_BLD = x_TD.view(g.x_BLD.shape)
        hidden, decisions, _ = self.encoder(groups=groups)
        segment_tokens = [
            g.x_BLD.shape[0] * (hi - lo)
            for g in groups
            for lo, hi in zip(g.ctx.segment_starts, list(g.ctx.segment_starts[1:]) + [g.x_BLD.shape[1]])
        ]
        return JointEncoding([EncoderOutput(h) for h in hidden], decisions, segment_tokens)

    # ----------------------------------------------------------------------------- features
    def features(self, hidden_XD: Tensor) -> Tensor:
        return self.predictor.project(hidden_XD)

    def uses_fc_prompt(self, task: str) -> bool:
        """Whether classification task `task` adds the FC prompt to its logits."""
        p = self.cfg.prompt
        return p.fc and (not p.fc_prompt_tasks or task in p.fc_prompt_tasks)

    def encode_targets(
        self, targets: TargetSet | Sequence, chunk_size: int | None = None
    ) -> Tensor:
        """Unit-norm [SPE]-output features of every candidate -> [N, D], in chunks of
        `chunk_size` sequences (bounded memory for the 49,411-word vocabulary)."""
        if isinstance(targets, Sequence):
            return self.features(self.encode(targets).hidden_BLD[:, 0])
        n = len(targets)
        step = n if chunk_size is None else max(1, chunk_size)
        feats = [
            self.features(self.encode(targets.slice(i, min(i + step, n))).hidden_BLD[:, 0])
            for i in range(0, n, step)
        ]
        return torch.cat(feats, dim=0)

    def logits(self, feats_XD: Tensor, target_feats_ND: Tensor, temperature: str) -> Tensor:
        return self.predictor.logits(feats_XD, target_feats_ND, temperature)

    # ----------------------------------------------------------------------------- decoding
    def decode_step(
        self,
        ids_B: Tensor,
        position: int,
        caches: list[LayerCache],
        ctx: RoutingContext,
        keep_kv: bool,
    ) -> EncoderOutput:
        """Encode one text token per sequence at text position `position`, attending to the
        cached keys/values and itself (no mask), routed with `ctx` (the caption-text row)."""
        positions = torch.full((1,), position, dtype=torch.long, device=ids_B.device)
        x_B1D = self.embed.text(ids_B[:, None], positions)
        return self.encoder(x_B1D, ctx, None, caches=caches, keep_kv=keep_kv)

    # ----------------------------------------------------------------------------- checkpoints
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write {'format', 'config', 'model'} atomically (temporary file + rename)."""
        from ..config import to_dict
        from ..utils.io import atomic_torch_save

        atomic_torch_save(
            {"format": CHECKPOINT_FORMAT, "config": to_dict(self.cfg), "model": self.state_dict()},
            path,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        overrides: list[str] | tuple[str, ...] = (),
        map_location: str = "cpu",
        adapter: str | os.PathLike | None = None,
    ) -> UniPerceiver:
        """Build from a model file (`save_pretrained`, `python -m uniperceiver.convert`) or a
        training checkpoint, with its saved config plus `overrides`; every key and shape must
        match (the error lists what does not). `adapter`: an adapter file
        (`modeling.adapter.save_adapter`) trained on this base, loaded on top of it; one trained on
        another base raises `AdapterError`. See `uniperceiver.modeling.checkpoint`."""
        from .checkpoint import load_model

        return load_model(path, evaluation=False, overrides=overrides, map_location=map_location, adapter=adapter)
