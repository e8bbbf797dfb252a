"""Captioning: training with spe-queries and a structured mask, and beam-search decoding with a
per-layer key/value cache (OFFICIAL.md 1.4, 3.5).

Shape legend: B batch, K beams, V vocabulary, T caption length, D width.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from moe import RoutingContext, SegmentDecision

from ..modeling.batch import Sequence, TaskBatch
from ..modeling.decoding import StaticDecoder
from ..modeling.encoder import LayerCache
from ..modeling.model import UniPerceiver
from .base import TaskOutput
from .losses import accuracy, cross_entropy

EOT_ID = 49407
SPE_ID = 49410


def caption_loss(
    model: UniPerceiver, batch: TaskBatch, vocab_feats_VD: Tensor, temporal_offsets: list[int] | None = None
) -> TaskOutput:
    """Query i (at text position i, seeing the prefix and words < i) predicts word i."""
    if batch.labels is None or not batch.inputs.caption_queries:
        raise ValueError(f"task {batch.task}: caption training needs labels and a [words ; queries] segment")
    enc = model.encode(batch.inputs, temporal_offsets=temporal_offsets)
    labels_BT = batch.labels.to(enc.hidden_BLD.device)
    t = labels_BT.shape[1]
    valid_BT = labels_BT != -1
    hidden_XD = enc.hidden_BLD[:, -t:][valid_BT]
    logits_XV = model.logits(model.features(hidden_XD), vocab_feats_VD, batch.temperature)
    targets_X = labels_BT[valid_BT]
    out = TaskOutput(logits=logits_XV, decisions=enc.decisions)
    out.losses["caption"] = batch.loss_weight * cross_entropy(logits_XV, targets_X, batch.label_smoothing)
    out.metrics["accuracy"] = accuracy(logits_XV, targets_X)
    return out


def beam_select(
    seq_logprob_BK1: Tensor,
    seq_mask_BK1: Tensor,
    word_logprob_BKV: Tensor,
    previous_words_BK: Tensor | None,
    beam_size: int,
    eot: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One beam step of the release's searcher over the current K beams (K = 1 at the first step).

    A beam whose previous word was EOT is frozen: it may only continue with EOT, at +0. Returns the
    surviving (beam, word) pairs and their summed log-probs, the alive mask reordered to them, and
    the word log-probs with frozen beams zeroed (what the release reports per token).
    """
    b, cur, vocab = word_logprob_BKV.shape
    candidate_BKV = seq_logprob_BK1 + word_logprob_BKV
    if previous_words_BK is not None:
        alive_BK1 = (previous_words_BK.view(b, cur) != eot).float().unsqueeze(-1)
        seq_mask_BK1 = seq_mask_BK1 * alive_BK1
        word_logprob_BKV = word_logprob_BKV * seq_mask_BK1
        old_BKV = seq_logprob_BK1.expand_as(candidate_BKV).contiguous()
        old_BKV[:, :, :eot] = -999
        old_BKV[:, :, eot + 1 :] = -999
        candidate_BKV = seq_mask_BK1 * candidate_BKV + old_BKV * (1 - seq_mask_BK1)
    sorted_lp, sorted_idx = torch.sort(candidate_BKV.view(b, -1), -1, descending=True)
    selected_logprob_BK, selected_idx_BK = sorted_lp[:, :beam_size], sorted_idx[:, :beam_size]
    selected_beam_BK = torch.div(selected_idx_BK, vocab, rounding_mode="floor")
    selected_words_BK = selected_idx_BK - selected_beam_BK * vocab
    seq_mask_BK1 = torch.gather(seq_mask_BK1, 1, selected_beam_BK.unsqueeze(-1))
    return selected_beam_BK, selected_words_BK, selected_logprob_BK, seq_mask_BK1, word_logprob_BKV


def rank_beams(ids_BKT: Tensor, seq_logprob_BK1: Tensor, len_penalty: float, eot: int) -> Tensor:
    """Beam order [B, K, 1] by sum(log p) / (non-EOT words + 1) ** len_penalty, best first."""
    if len_penalty > 0:
        lengths_BK1 = ids_BKT.ne(eot).sum(-1, keepdim=True) + 1
        seq_logprob_BK1 = seq_logprob_BK1 / lengths_BK1.float() ** len_penalty
    return torch.sort(seq_logprob_BK1, 1, descending=True)[1]


@dataclass
class BeamSearchOutput:
    ids_BT: Tensor  # best beam's words (EOT-padded after the end)
    logprobs_BT: Tensor  # log-probability of each chosen word (0 after EOT)
    # routed MoE decisions of every encoder call, in call order (prefix, then query/word steps)
    decisions: list[list[tuple[str, SegmentDecision]]] = field(default_factory=list)
    # every beam, best first: token ids [B, K, T] and per-word log-probabilities [B, K, T]
    beam_ids_BKT: Tensor | None = None
    beam_logprobs_BKT: Tensor | None = None


def _append(caches: list[LayerCache], new: list[LayerCache]) -> list[LayerCache]:
    return [
        LayerCache(torch.cat([c.key_BHMd, n.key_BHMd], 2), torch.cat([c.value_BHMd, n.value_BHMd], 2))
        for c, n in zip(caches, new)
    ]


@torch.no_grad()
def beam_search(
    model: UniPerceiver,
    prefix: Sequence,
    text_attributes_SA: Tensor | None,
    vocab_feats_VD: Tensor,
    *,
    temperature: str = "caption",
    beam_size: int = 2,
    max_len: int = 21,
    len_penalty: float = 0.0,
    record_decisions: bool = False,
    vocab_token_ids_V: Tensor | None = None,
    static: bool | None = None,
    cuda_graphs: bool = True,
) -> BeamSearchOutput:
    """The release's beam search (CaptionBeamSearcherV3), with cached keys/values.

    Step t: a `<|spe|>` query at text position t attends to the prefix ([SPE] + visual) and the
    words chosen so far; its similarity to the vocabulary gives log-probs; the top `beam_size`
    (beam, word) pairs survive (beams that emitted EOT only continue with EOT at +0); the chosen
    word is then encoded at position t and its keys/values join the cache. Finished beams are
    ranked by sum(log p) / (non-EOT words + 1) ** len_penalty.

    `vocab_token_ids_V` gives the token id of each row of `vocab_feats_VD` when it covers a subset
    of the vocabulary (`TargetSet.token_ids_N`); None means row v is token v. The returned ids are
    token ids either way.

    `static` (default: on CUDA, unless `record_decisions`) runs the device-resident static step
    (`uniperceiver.modeling.decoding`: preallocated cache, no host round trip, replayed as a CUDA
    graph when `cuda_graphs`); otherwise the eager loop below, whose ids are the reference. Either
    way the experts of every MoE layer are merged once per generation (`RoutingContext.merged_cache`).
    """
    b = prefix.batch_size
    enc = model.encode(prefix, keep_kv=True)
    caches = enc.caches
    assert caches is not None
    device = enc.hidden_BLD.device
    calls = [enc.decisions] if record_decisions else []
    # Generated text is routed with the caption-text row (OFFICIAL.md 2.4).
    ctx = RoutingContext(
        segment_starts=(0,),
        attributes_SA=None if text_attributes_SA is None else text_attributes_SA.to(device),
        task_ids_S=torch.full((1,), prefix.task_id, dtype=torch.long, device=device),
        modality_ids_S=torch.ones(1, dtype=torch.long, device=device),
        merged_cache={},  # this generation's merged expert weights (inference only)
    )
    vocab = vocab_feats_VD.shape[0]
    eot = EOT_ID  # the vocabulary row of <|endoftext|>
    if vocab_token_ids_V is not None:
        vocab_token_ids_V = vocab_token_ids_V.to(device).long()
        if vocab_token_ids_V.shape != (vocab,):
            raise ValueError(f"vocab_token_ids_V {tuple(vocab_token_ids_V.shape)} does not match {vocab} vocabulary rows")
        hits = torch.nonzero(vocab_token_ids_V == EOT_ID).flatten()
        if hits.numel() == 0:
            raise ValueError(f"the vocabulary subset lacks <|endoftext|> ({EOT_ID}): captions could never end")
        eot = int(hits[0])

    if static is None:
        static = device.type == "cuda" and not record_decisions
    if static:
        if record_decisions:
            raise ValueError("record_decisions needs the eager loop (static=False)")
        decoder = StaticDecoder(model, ctx, vocab_feats_VD, temperature, beam_size, max_len, eot, vocab_token_ids_V,
                                beam_select)
        state = decoder.run(caches, b, graphs=cuda_graphs and device.type == "cuda")
        return _best_beams(state.ids_BKT, state.logprobs_BKT, state.seq_logprob_BK1, len_penalty, eot,
                           vocab_token_ids_V, calls)

    seq_logprob_BK1 = torch.zeros(b, 1, 1, device=device)
    seq_mask_BK1 = torch.ones(b, beam_size, 1, device=device)
    outputs: list[Tensor] = []
    log_probs: list[Tensor] = []
    selected_words_BK = None
    for t in range(max_len):
        cur = 1 if t == 0 else beam_size
        query_ids = torch.full((b * cur,), SPE_ID, dtype=torch.long, device=device)
        step = model.decode_step(query_ids, t, caches, ctx, keep_kv=False)
        if record_decisions:
            calls.append(step.decisions)
        logits_XV = model.logits(model.features(step.hidden_BLD[:, 0]), vocab_feats_VD, temperature)
        word_logprob_BKV = F.log_softmax(logits_XV.float(), dim=-1).view(b, cur, vocab)
        selected_beam_BK, selected_words_BK, selected_logprob_BK, seq_mask_BK1, word_logprob_BKV = beam_select(
            seq_logprob_BK1, seq_mask_BK1, word_logprob_BKV, selected_words_BK, beam_size, eot)

        # Reorder the cache rows (b * cur) to the surviving beams (b * beam_size).
        rows = (torch.arange(b, device=device)[:, None] * cur + selected_beam_BK).reshape(-1)
        caches = [c.select(rows) for c in caches]
        seq_logprob_BK1 = selected_logprob_BK.unsqueeze(-1)
        outputs = [torch.gather(o, 1, selected_beam_BK.unsqueeze(-1)) for o in outputs]
        outputs.append(selected_words_BK.unsqueeze(-1))
        this_lp_BKV = torch.gather(word_logprob_BKV, 1, selected_beam_BK.unsqueeze(-1).expand(b, beam_size, vocab))
        this_lp_BK1 = torch.gather(this_lp_BKV, 2, selected_words_BK.unsqueeze(-1))
        log_probs = [torch.gather(o, 1, selected_beam_BK.unsqueeze(-1)) for o in log_probs]
        log_probs.append(this_lp_BK1)

        word_ids = selected_words_BK if vocab_token_ids_V is None else vocab_token_ids_V[selected_words_BK]
        word = model.decode_step(word_ids.reshape(-1), t, caches, ctx, keep_kv=True)
        if record_decisions:
            calls.append(word.decisions)
        caches = _append(caches, word.caches)

    return _best_beams(torch.cat(outputs, -1), torch.cat(log_probs, -1), seq_logprob_BK1, len_penalty, eot,
                       vocab_token_ids_V, calls)


def _best_beams(ids_BKT: Tensor, lp_BKT: Tensor, seq_logprob_BK1: Tensor, len_penalty: float, eot: int,
                vocab_token_ids_V: Tensor | None, calls: list) -> BeamSearchOutput:
    """Rank the finished beams: the best one's token ids and word log-probs, and every beam, best first."""
    order_BKT = rank_beams(ids_BKT, seq_logprob_BK1, len_penalty, eot).expand_as(ids_BKT)
    ids_BKT = torch.gather(ids_BKT, 1, order_BKT)
    lp_BKT = torch.gather(lp_BKT, 1, order_BKT)
    if vocab_token_ids_V is not None:
        ids_BKT = vocab_token_ids_V[ids_BKT]
    return BeamSearchOutput(ids_BKT[:, 0], lp_BKT[:, 0], calls, ids_BKT, lp_BKT)
