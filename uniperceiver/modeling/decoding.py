"""Caption decoding as a static step: preallocated key/value cache, device-resident bookkeeping,
the step replayed as a CUDA graph on GPUs.

Shape legend: B batch, K beams, X = B*K decoding rows, V vocabulary, T max caption length,
H heads, M = P + T cache slots (P prefix tokens), Dh head width, D width.

`uniperceiver.tasks.captioning.beam_search` grows the cache with torch.cat at every step and
builds every shape on the host: right for the CPU (and the reference for the caption ids), but
on a GPU each of its ~2 x 12 layers x 20 steps of tiny kernels waits for the host. Here, per
generation:
- one buffer per layer of M = P + T slots for X = B*K rows, the prefix copied into every
  beam's rows; a device counter `filled` says how many slots hold keys, and attention masks
  the rest (same result as attending to exactly the filled slots, to float rounding);
- the text position, the EOT-frozen beam mask, the running log-probs, the chosen ids and
  log-probs are device tensors updated in place; beams are reordered by in-place row gathers;
- merged expert weights are built once per generation (`RoutingContext.merged_cache`), and the
  vocabulary features and temperature are fixed for the whole generation;
- the first step (one beam per image) runs eagerly; every later step has the same shapes and
  addresses, so on CUDA one step is captured as a CUDA graph and replayed (no host round trip
  at all); elsewhere the same step runs eagerly.
Nothing in a step reads a device value on the host (tests/modeling/test_static_decoding.py).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moe import RoutingContext

from .encoder import LayerCache
from .model import UniPerceiver

SPE_ID = 49410
log = logging.getLogger(__name__)


@dataclass
class DecodeState:
    """Everything a decoding step reads and writes, on the device (fixed shapes from step 1)."""

    caches: list[LayerCache]  # [X, H, M, Dh] per layer
    filled: Tensor  # long scalar: cache slots holding keys/values (P + t)
    position: Tensor  # long [1]: text position t of the step
    seq_logprob_BK1: Tensor
    seq_mask_BK1: Tensor
    previous_words_BK: Tensor  # vocabulary rows chosen at the previous step
    ids_BKT: Tensor  # vocabulary rows chosen so far (columns >= t are 0)
    logprobs_BKT: Tensor


class StaticDecoder:
    """Runs the release's beam search (`captioning.beam_search`'s semantics) on a `DecodeState`."""

    def __init__(self, model: UniPerceiver, ctx: RoutingContext, vocab_feats_VD: Tensor, temperature: str,
                 beam_size: int, max_len: int, eot: int, vocab_token_ids_V: Tensor | None,
                 select: Callable) -> None:
        """`select`: the beam selection rule (`captioning.beam_select`, the release's)."""
        self.model, self.ctx, self.select = model, ctx, select
        self.vocab_feats_VD = vocab_feats_VD
        self.scale = model.predictor.scale(temperature)  # the temperature, once per generation
        self.beam_size, self.max_len = beam_size, max_len
        self.eot = eot
        self.vocab_token_ids_V = vocab_token_ids_V
        self.prefix_len = 0  # set by `start`
        if max_len > model.cfg.max_text_positions:
            raise ValueError(f"max_len={max_len} > max_text_positions={model.cfg.max_text_positions}")

    # --- one encoder call over the X rows, attending to the filled slots and itself -----------
    def encode(self, state: DecodeState, ids_X: Tensor, write: bool) -> Tensor:
        model = self.model
        x_X1D = model.embed.text(ids_X[:, None], state.position, check_positions=False)
        slots = state.caches[0].key_BHMd.shape[2]
        allowed_M = torch.arange(slots, device=ids_X.device) < state.filled
        allowed_111M = torch.cat([allowed_M, allowed_M.new_ones(1)]).view(1, 1, 1, slots + 1)
        out = model.encoder(x_X1D, self.ctx, allowed_111M, caches=state.caches, keep_kv=write)
        if write:  # this token's keys/values go to slot `filled`
            slot_1 = state.filled.view(1)
            for cache, new in zip(state.caches, out.caches):
                cache.key_BHMd.index_copy_(2, slot_1, new.key_BHMd)
                cache.value_BHMd.index_copy_(2, slot_1, new.value_BHMd)
        return out.hidden_BLD[:, 0]

    def start(self, prefix_caches: list[LayerCache], batch: int) -> DecodeState:
        k = self.beam_size
        device = prefix_caches[0].key_BHMd.device
        caches = []
        for c in prefix_caches:
            x, h, p, dh = c.key_BHMd.shape
            key = c.key_BHMd.new_zeros(x * k, h, p + self.max_len, dh)
            value = torch.zeros_like(key)
            key[:, :, :p] = c.key_BHMd.repeat_interleave(k, 0)
            value[:, :, :p] = c.value_BHMd.repeat_interleave(k, 0)
            caches.append(LayerCache(key, value))
        p = prefix_caches[0].key_BHMd.shape[2]
        self.prefix_len = p
        return DecodeState(
            caches=caches,
            filled=torch.tensor(p, device=device),
            position=torch.zeros(1, dtype=torch.long, device=device),
            seq_logprob_BK1=torch.zeros(batch, 1, 1, device=device),
            seq_mask_BK1=torch.ones(batch, k, 1, device=device),
            previous_words_BK=torch.zeros(batch, k, dtype=torch.long, device=device),
            ids_BKT=torch.zeros(batch, k, self.max_len, dtype=torch.long, device=device),
            logprobs_BKT=torch.zeros(batch, k, self.max_len, device=device),
        )

    def step(self, state: DecodeState, first: bool) -> None:
        """One beam step in place: query -> log-probs -> beam selection -> reorder -> word."""
        b, k, vocab = state.ids_BKT.shape[0], self.beam_size, self.vocab_feats_VD.shape[0]
        device = state.ids_BKT.device
        query_X = torch.full((b * k,), SPE_ID, dtype=torch.long, device=device)
        hidden_XD = self.encode(state, query_X, write=False)
        logits_XV = self.scale * (self.model.features(hidden_XD) @ self.vocab_feats_VD.t())  # Predictor.logits
        word_logprob_BKV = F.log_softmax(logits_XV.float(), dim=-1).view(b, k, vocab)
        if first:  # every beam row still holds the same image: search from beam 0 only
            word_logprob_BKV = word_logprob_BKV[:, :1]
        previous = None if first else state.previous_words_BK
        selected_beam_BK, selected_words_BK, selected_logprob_BK, seq_mask_BK1, word_logprob_BKV = self.select(
            state.seq_logprob_BK1, state.seq_mask_BK1, word_logprob_BKV, previous, k, self.eot)

        rows_X = (torch.arange(b, device=device)[:, None] * k + selected_beam_BK).reshape(-1)
        # Beams move within their image, whose prefix slots every beam shares: only the word
        # slots are reordered. In place: the buffers keep their addresses (CUDA graphs).
        p = self.prefix_len
        for cache in state.caches:
            for buf_XHMd in (cache.key_BHMd, cache.value_BHMd):
                buf_XHMd[:, :, p:].copy_(buf_XHMd[:, :, p:].index_select(0, rows_X))
        if first:
            state.seq_logprob_BK1 = selected_logprob_BK.unsqueeze(-1).contiguous()
        else:
            state.seq_logprob_BK1.copy_(selected_logprob_BK.unsqueeze(-1))
        state.seq_mask_BK1.copy_(seq_mask_BK1)
        beam_BKT = selected_beam_BK.unsqueeze(-1).expand(b, k, self.max_len)
        this_lp_BKV = torch.gather(word_logprob_BKV, 1, selected_beam_BK.unsqueeze(-1).expand(b, k, vocab))
        this_lp_BK1 = torch.gather(this_lp_BKV, 2, selected_words_BK.unsqueeze(-1))
        state.ids_BKT.copy_(torch.gather(state.ids_BKT, 1, beam_BKT))
        state.ids_BKT.index_copy_(2, state.position, selected_words_BK.unsqueeze(-1))
        state.logprobs_BKT.copy_(torch.gather(state.logprobs_BKT, 1, beam_BKT))
        state.logprobs_BKT.index_copy_(2, state.position, this_lp_BK1)
        state.previous_words_BK.copy_(selected_words_BK)

        words_BK = selected_words_BK if self.vocab_token_ids_V is None else self.vocab_token_ids_V[selected_words_BK]
        self.encode(state, words_BK.reshape(-1), write=True)
        state.filled.add_(1)
        state.position.add_(1)

    def run(self, prefix_caches: list[LayerCache], batch: int, graphs: bool) -> DecodeState:
        state = self.start(prefix_caches, batch)
        self.step(state, first=True)
        remaining = self.max_len - 1
        if graphs and remaining >= 2:
            # Warm up one real step on a side stream (allocations, lazy inits), then capture the
            # next one (capture records, it does not run) and replay it for every later step.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(state, first=False)
            torch.cuda.current_stream().wait_stream(side)
            remaining -= 1
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.step(state, first=False)
            except RuntimeError as err:
                # Capture records kernels without running them, so the state is untouched: the
                # same steps run eagerly (same results, slower). Say so, once per generation.
                log.warning("caption decoding: CUDA graph capture failed (%s); decoding eagerly", err)
                graph = None
            for _ in range(remaining):
                graph.replay() if graph is not None else self.step(state, first=False)
        else:
            for _ in range(remaining):
                self.step(state, first=False)
        return state
