"""Caption decoding cost per generated token as captions grow: beam search with the per-layer
key/value cache (`uniperceiver.tasks.beam_search`) against re-encoding the whole sequence at
every step, measured in the same run.

    python benchmarks/caption_decoding.py                          # base MoE, 224 px, beam 2
    python benchmarks/caption_decoding.py --model configs/model/tiny_moe.yaml --image-size 64
    python benchmarks/caption_decoding.py --lengths 5 10 20 40 --batch 8 --device cuda

For each caption length L (beam search always runs L steps) and mode it times the decode of a
batch of random images after warm-up and reports the median over repeats of
ms_per_token = (decode time - prefix encoding time) / L, with min..max. The cached mode should be
flat in L (each step runs one query and one word token per beam against the cache; only the
attention over the history grows); the re-encoding mode grows linearly (step t re-runs all
prefix + t tokens). Before timing, both modes decode the same batch and must give the same ids.
Vocabulary features are random unit vectors (their encoding, done once per evaluation, is not
part of decoding). Rows are appended as JSONL to
benchmarks/results/caption_decoding_<host>_<date>.jsonl with the machine, versions and commit.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from expert_throughput import git_commit, host_kind, machine_info  # noqa: E402  (shared harness bits)

from uniperceiver import cli  # noqa: E402
from uniperceiver.config import ModelConfig, from_dict, load_yaml  # noqa: E402
from uniperceiver.modeling.attributes import task_attributes  # noqa: E402
from uniperceiver.modeling.batch import Segment, Sequence  # noqa: E402
from uniperceiver.modeling.model import UniPerceiver  # noqa: E402
from uniperceiver.tasks.captioning import EOT_ID, SPE_ID, beam_search, beam_select, rank_beams  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@torch.no_grad()
def reencode_beam_search(model: UniPerceiver, prefix: Sequence, text_rows: Tensor, vocab_VD: Tensor, *,
                         beam_size: int, max_len: int, len_penalty: float, temperature: str = "caption") -> Tensor:
    """The same beam search as `beam_search` (same bookkeeping, EOT freezing and length
    penalty), but every step re-encodes [SPE + image ; words 0..t-1 ; query] from scratch with a
    mask that reproduces what the cache holds: the prefix sees itself, word i sees the prefix and
    words <= i, the query sees everything. Returns the best beam's ids [B, max_len]."""
    b = prefix.batch_size
    device = vocab_VD.device
    pixels = prefix.segments[0]
    vocab = vocab_VD.shape[0]
    rows_SA = torch.cat([prefix.attributes_SA.to(device), text_rows.to(device)])
    prefix_len = 1 + model.embed_sequence(Sequence([Segment(pixels.modality, pixels.data[:1])]))[0].shape[1] - 1

    def query_hidden(img_rows: Tensor, words_XT: Tensor) -> Tensor:
        x = words_XT.shape[0]
        t = words_XT.shape[1]
        ids = torch.cat([words_XT, torch.full((x, 1), SPE_ID, dtype=torch.long, device=device)], 1)
        seq = Sequence([Segment(pixels.modality, pixels.data[img_rows]), Segment("text", ids)], attributes_SA=rows_SA,
                       task_id=prefix.task_id)
        x_BLD, _, lengths = model.embed_sequence(seq)
        ctx = model.routing_context(seq, lengths)
        total = prefix_len + t + 1
        allowed = torch.zeros(total, total, dtype=torch.bool, device=device)
        allowed[:, :prefix_len] = True
        allowed[prefix_len:, prefix_len:] = torch.ones(t + 1, t + 1, dtype=torch.bool, device=device).tril()
        return model.encoder(x_BLD, ctx, allowed[None, None]).hidden_BLD[:, -1]

    seq_logprob_BK1 = torch.zeros(b, 1, 1, device=device)
    seq_mask_BK1 = torch.ones(b, beam_size, 1, device=device)
    img_rows = torch.arange(b, device=device)
    words = torch.zeros(b, 0, dtype=torch.long, device=device)
    selected_words_BK = None
    for t in range(max_len):
        cur = 1 if t == 0 else beam_size
        logits_XV = model.logits(model.features(query_hidden(img_rows, words)), vocab_VD, temperature)
        word_logprob_BKV = F.log_softmax(logits_XV.float(), dim=-1).view(b, cur, vocab)
        selected_beam_BK, selected_words_BK, selected_logprob_BK, seq_mask_BK1, _ = beam_select(
            seq_logprob_BK1, seq_mask_BK1, word_logprob_BKV, selected_words_BK, beam_size, EOT_ID)
        rows = (torch.arange(b, device=device)[:, None] * cur + selected_beam_BK).reshape(-1)
        img_rows = img_rows[rows]
        words = torch.cat([words[rows], selected_words_BK.reshape(-1, 1)], 1)
        seq_logprob_BK1 = selected_logprob_BK.unsqueeze(-1)
    ids_BKT = words.view(b, beam_size, max_len)
    order_BK1 = rank_beams(ids_BKT, seq_logprob_BK1, len_penalty, EOT_ID)
    return torch.gather(ids_BKT, 1, order_BK1.expand(b, beam_size, max_len))[:, 0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def build(args: argparse.Namespace, device: torch.device):
    data = load_yaml(args.model)["model"]
    data.update(drop_path=0.0)
    if args.image_size:
        data["image_size"] = args.image_size
    cfg = from_dict(ModelConfig, data, source=args.model)
    torch.manual_seed(0)
    model = UniPerceiver(cfg).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    vocab = F.normalize(torch.randn(cfg.vocab_size, cfg.d_model, generator=gen), dim=-1).to(device)
    return model, task_attributes("image_caption").to(device), vocab


def make_prefix(model: UniPerceiver, rows: Tensor, batch: int, device: torch.device) -> Sequence:
    """`batch` random images, the same ones for every run with this batch size."""
    size = model.cfg.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(device)
    return Sequence([Segment("image", pixels)], attributes_SA=rows[:1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.path.join(ROOT, "configs/model/base_moe.yaml"))
    p.add_argument("--image-size", type=int, default=None, help="default: the model config's")
    p.add_argument("--batch", type=int, nargs="+", default=[8], help="one or more batch sizes (images)")
    p.add_argument("--beam", type=int, default=2)
    p.add_argument("--len-penalty", type=float, default=2.0)
    p.add_argument("--lengths", type=int, nargs="+", default=[5, 10, 20, 40])
    p.add_argument("--modes", nargs="+", default=["cached", "reencode"], choices=["cached", "reencode"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out-dir", default=RESULTS_DIR)
    p.add_argument("--static", choices=["auto", "on", "off"], default="auto",
                   help="cached mode: the static step (auto: on CUDA, where it is replayed as a CUDA graph)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    model, rows, vocab = build(args, device)
    text_rows = rows[1:]
    static = {"auto": None, "on": True, "off": False}[args.static]
    info = machine_info(device)
    stamp = _dt.datetime.now(_dt.timezone.utc)
    out_rows, all_same = [], True
    for batch in args.batch:
        prefix = make_prefix(model, rows, batch, device)

        def cached(length: int) -> Tensor:
            return beam_search(model, prefix, text_rows, vocab, beam_size=args.beam, max_len=length,
                               len_penalty=args.len_penalty, static=static).ids_BT

        def reencode(length: int) -> Tensor:
            return reencode_beam_search(model, prefix, text_rows, vocab, beam_size=args.beam, max_len=length,
                                        len_penalty=args.len_penalty)

        modes = {"cached": cached, "reencode": reencode}
        # Same captions from both decoders (the baseline is the same algorithm, not a straw man).
        check_len = min(args.lengths)
        same = None
        if len(args.modes) == 2:
            same = bool(torch.equal(cached(check_len), reencode(check_len)))
            all_same = all_same and same
            print(f"batch {batch}: cached == re-encoded ids at L={check_len}: {same}")

        with torch.no_grad():
            prefix_times = [_time(lambda: model.encode(prefix, keep_kv=True), device)
                            for _ in range(args.warmup + args.repeats)]
        prefix_s = statistics.median(prefix_times[args.warmup:])
        print(f"{'mode':<9} {'L':>4} {'ms/token':>10} {'min..max':>17} {'tokens/s':>10}  (prefix "
              f"{1000 * prefix_s:.1f} ms, batch {batch} x beam {args.beam}, {device})")
        for length in args.lengths:
            for mode in args.modes:
                fn = modes[mode]
                times = [_time(lambda: fn(length), device) for _ in range(args.warmup + args.repeats)][args.warmup:]
                per_token = [1000 * (t - prefix_s) / length for t in times]
                row = {
                    "benchmark": "caption_decoding", "mode": mode, "max_len": length,
                    "ms_per_token_median": statistics.median(per_token), "ms_per_token_min": min(per_token),
                    "ms_per_token_max": max(per_token), "tokens_per_s": 1000 * batch / statistics.median(per_token),
                    "prefix_ms": 1000 * prefix_s, "batch": batch, "beam": args.beam, "len_penalty": args.len_penalty,
                    "model": os.path.relpath(args.model, ROOT), "d_model": model.cfg.d_model,
                    "num_layers": model.cfg.num_layers, "moe": model.cfg.moe.enabled,
                    "image_size": model.cfg.image_size, "dtype": "float32",
                    "static_step": (device.type == "cuda") if static is None else static,
                    "repeats": args.repeats, "warmup": args.warmup, "ids_match": same,
                    "machine": info, "commit": git_commit(), "time": stamp.isoformat(timespec="seconds"),
                }
                out_rows.append(row)
                print(f"{mode:<9} {length:>4} {row['ms_per_token_median']:>10.2f} "
                      f"{row['ms_per_token_min']:>8.2f}..{row['ms_per_token_max']:<8.2f} {row['tokens_per_s']:>10.1f}")
    rows = out_rows
    if not args.no_write:
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, f"caption_decoding_{host_kind(device)}_{stamp:%Y%m%d}.jsonl")
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"appended {len(rows)} rows to {path}")
    return cli.EXIT_OK if all_same else cli.EXIT_FAILED  # the two decoders disagree


if __name__ == "__main__":
    sys.exit(cli.run(main, handles_help=True))  # exit codes: 0 ok, 2 bad input, 3 failed
