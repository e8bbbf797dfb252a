"""Captioning: training with spe-queries and a structured mask, and beam-search decoding with a
per-layer key/value cache (OFFICIAL.md 1.4, 3.5), scored with the COCO caption metrics.

Shape legend: B batch, K beams, V vocabulary, T caption length, D width.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moe import Decision

from ..evaluation.caption_metrics import SCORERS, caption_metrics, check_caption_tools
from ..evaluation.evaluators import EvalInputError, Evaluator, TaskResult, jsonable
from ..modeling.attributes import CAPTION_TEXT, CAPTION_VISUAL
from ..modeling.batch import Segment, Sequence, TaskBatch
from ..modeling.decoding import StaticDecoder
from ..modeling.encoder import LayerCache
from ..modeling.model import UniPerceiver
from ..tokenization import ClipTokenizer, pad_ids
from .base import TaskOutput, word_prediction_output
from ..utils.task_registry import TaskSpec

EOT_ID = 49407
SPE_ID = 49410


def caption_loss(
    model: UniPerceiver, batch: TaskBatch, vocab_feats_VD: Tensor, temporal_offsets: list[int] | None = None
) -> TaskOutput:
    """Query i (at text position i, seeing the prefix and words < i) predicts word i."""
    if batch.labels is None or not batch.inputs.caption_queries:
        raise ValueError(f"task {batch.task}: caption training needs labels and a [words ; queries] segment")
    enc = model.encode(batch.inputs, temporal_offsets=temporal_offsets)
    hidden_BTD = enc.hidden_BLD[:, -batch.labels.shape[1]:]  # the queries
    return word_prediction_output(model, batch, hidden_BTD, vocab_feats_VD, "caption", enc.decisions)


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
    decisions: list[list[tuple[str, Decision]]] = field(default_factory=list)
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
    # Generated text is routed with the caption-text row (OFFICIAL.md 2.4): the context of a
    # one-segment text sequence, built as every encoder call builds its own, plus this
    # generation's merged expert weights (inference only).
    text = Sequence([Segment("text", torch.zeros(b, 1, dtype=torch.long, device=device))],
                    attributes_SA=text_attributes_SA, task_id=prefix.task_id)
    ctx = replace(model.routing_context(text, [1, 1]), merged_cache={})
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


def collate(c: Any, samples: list[dict[str, Any]]) -> TaskBatch:
    """Training (`caption_queries=True`): visual segment + text segment `[caption + EOT (padded
    to T) ; <|spe|> x len (padded to T)]` of length 2T, positions `[0..T-1, 0..T-1]`, padding
    masked in both halves; `labels` [B, T] = the caption ids, -1 at padding. Evaluation: the
    visual segment only, `decode_attributes_SA` = the caption-text row."""
    seg = c.single_view(samples)
    rows = c.rows("input")  # [visual row, caption-text row]
    if not c.training:
        meta = {"captions": [s.get("captions") for s in samples]}
        return c.batch(samples, c.seq([seg], rows=rows[:1]), decode_attributes_SA=rows[1:],
                       target_set=c.task.target_set, meta=meta)
    seqs = c.tokenizer.encode_texts(c.need(samples, "caption"), append_eot=True, max_len=c.task.max_text_len)
    words, word_mask = pad_ids(seqs)
    queries, query_mask = pad_ids([[ClipTokenizer.SPE] * len(s) for s in seqs])
    labels, _ = pad_ids(seqs, pad=-1)
    t = words.shape[1]
    text = Segment("text", torch.cat([words, queries], 1), torch.cat([word_mask, query_mask], 1),
                   positions=torch.arange(t).repeat(2))
    inputs = c.seq([seg, text], rows=rows, caption_queries=True)
    return c.batch(samples, inputs, labels=labels, target_set=c.task.target_set)


class CaptionEvaluator(Evaluator):
    """Beam search (beam, max length, length penalty from the task) and COCO caption metrics."""

    tokenizer: Any = None
    spice: bool | None = None
    scorers: tuple[str, ...] = SCORERS

    def check_dataset(self, dataset: Any) -> None:
        check_caption_tools()  # no Java: fail now, not after decoding the whole set
        ids = None if self.target_set is None else self.target_set.token_ids_N
        if ids is not None and not bool((ids == EOT_ID).any()):
            raise EvalInputError(f"task {self.task.name!r}: the vocabulary subset {self.task.target_set!r} "
                                 f"({self.target_source}) lacks <|endoftext|> ({EOT_ID}); captions could never end")

    @torch.no_grad()
    def process(self, indices: list[int], infos: list[dict], batch: TaskBatch) -> list[tuple[int, Any]]:
        from ..modeling.attributes import task_attributes

        vocab_VD = self.target_features()
        text_rows = batch.decode_attributes_SA
        if text_rows is None and batch.inputs.attributes_SA is not None:
            text_rows = task_attributes(self.task.type, "input")[1:]  # the caption-text row
        assert self.target_set is not None
        out = beam_search(self.model, batch.inputs, text_rows, vocab_VD, temperature=batch.temperature,
                          beam_size=self.task.beam_size, max_len=self.task.max_gen_len,
                          len_penalty=self.task.len_penalty, vocab_token_ids_V=self.target_set.token_ids_N)
        meta_caps = batch.meta.get("captions")
        meta_ids = batch.meta.get("ids")
        records = []
        for i, idx in enumerate(indices):
            refs = infos[i].get("captions") if i < len(infos) else None
            if refs is None and meta_caps is not None:
                refs = meta_caps[i]
            sid = infos[i].get("id") if i < len(infos) and "id" in infos[i] else (
                meta_ids[i] if meta_ids is not None else idx)
            if not refs:
                raise EvalInputError(f"task {self.task.name!r}: sample {sid!r} has no reference captions")
            text = self.tokenizer.decode(out.ids_BT[i].cpu(), stop_at_eot=True).strip()
            records.append((idx, {"id": sid, "caption": text, "references": [str(r) for r in refs]}))
        return records

    def summarize(self, records: list[Any]) -> TaskResult:
        refs = {i: r["references"] for i, r in enumerate(records)}
        preds = {i: r["caption"] for i, r in enumerate(records)}
        metrics, notes = caption_metrics(refs, preds, spice=self.spice, scorers=self.scorers)
        predictions = [{"id": jsonable(r["id"]), "caption": r["caption"]} for r in records]
        return TaskResult(metrics, notes, predictions)


_ROWS = {"input": (CAPTION_VISUAL, CAPTION_TEXT)}
_COMMON = dict(collate=collate, forward=caption_loss, evaluator=CaptionEvaluator, target_sets=("vocabulary",),
               token_labels=True)
SPECS = (
    TaskSpec("image_caption", "caption", "image", _ROWS, "caption", formats=("coco_karpathy", "flickr30k", "jsonl",
                                                                             "demo"), **_COMMON),
    TaskSpec("video_caption", "caption", "video", _ROWS, "caption", formats=("msvd", "jsonl", "demo"), **_COMMON),
)
