"""python -m uniperceiver.tools.check_official BUNDLE.pt [--json OUT] [--rtol 1e-4]

Reproduces a numerical reference bundle made by the official code (shaped like
shared/reference/official_tiny/reference.pt): converts its state dict, translates its collated
batches, runs every task in eval and in deterministic training mode, and compares every quantity.

Prompt-tuning bundles (shaped like shared/reference/official_prompt/reference_prompt_a.pt) are
recognised by their `prompt` entry: the model is built with the prompt switches the state dict
shows (deep prompt lengths, shared or separate target prompts, FC prompt, similarity weight), the
FC prompt goes to the bundle's `fc_prompt_tasks`, and the check adds the trainable parameter set
after the bundle's PROMPT_PARAM freezing and the gradient of every task's training loss with
respect to every trainable parameter.

Errors are reported per quantity as max_abs = max|ours - ref| and max_rel = max_abs / max|ref|
(relative to the quantity's scale, so near-zero elements do not dominate); ids and expert
choices are compared exactly. Exit status 1 when a float exceeds --rtol or an id differs.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from torch import Tensor

from ..convert.api import convert_state_dict
from ..convert.export import official_names
from ..convert.official_batches import parse_official_tasks, shared_target_sets, translate_batch
from ..modeling.freezing import apply_trainable
from ..modeling.model import UniPerceiver
from ..tasks import beam_search, run_task


class Comparison:
    def __init__(self, rtol: float) -> None:
        self.rtol = rtol
        self.results: dict[str, dict[str, Any]] = {}

    def floats(self, key: str, ours: Tensor | float, ref: Tensor | float) -> None:
        ours_t = torch.as_tensor(ours, dtype=torch.float64).detach().cpu()
        ref_t = torch.as_tensor(ref, dtype=torch.float64).detach().cpu()
        if ours_t.shape != ref_t.shape:
            self.results[key] = {"max_abs": float("inf"), "max_rel": float("inf"),
                                 "error": f"shape {tuple(ours_t.shape)} vs reference {tuple(ref_t.shape)}"}
            return
        max_abs = float((ours_t - ref_t).abs().max()) if ours_t.numel() else 0.0
        scale = float(ref_t.abs().max()) if ref_t.numel() else 0.0
        self.results[key] = {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs}

    def exact(self, key: str, ours: Tensor | list, ref: Tensor | list) -> None:
        same = torch.equal(torch.as_tensor(ours).cpu().long(), torch.as_tensor(ref).cpu().long())
        self.results[key] = {"exact": bool(same)}

    def failed(self) -> list[str]:
        return [k for k, r in self.results.items()
                if ("exact" in r and not r["exact"]) or ("max_rel" in r and not r["max_rel"] <= self.rtol)]


def _reference_calls(entries: list) -> list[list[tuple[str, Tensor, Tensor]]]:
    """Group the bundle's gate log (name, [ids per k], [gates per k]) into encoder calls and keep
    one entry per routing decision (qkv_proj and linear1: attention-out and linear2 reuse them).

    Every encoder call starts at the first MoE layer's qkv_proj; the official decoder runs that
    projection twice in a row (query part, then key/value part) with one decision.
    """
    calls: list[list[tuple[str, Tensor, Tensor]]] = []
    first = entries[0][0] if entries else None
    previous = None
    for name, ids, gates in entries:
        repeated = name == previous
        previous = name
        if name == first and not repeated:
            calls.append([])
        if repeated or not name.endswith(("qkv_proj", "linear1")):
            continue
        calls[-1].append((name, torch.stack(list(ids), -1), torch.stack(list(gates), -1)))
    return calls


def _compare_gates(cmp: Comparison, task: str, ours_calls: list, ref_entries: list) -> None:
    """When a call of ours routes fewer segments than the reference logged (the caption prefix
    uses only the visual row; decoding only the text row), compare with the rows it used: the
    first rows for call 0, the last rows for the decoding calls.

    Only calls that routed something count, on both sides: the bundle logs MoE calls only, so a
    dense model's calls (no decisions) match a bundle whose gate lists are empty."""
    ref_calls = _reference_calls(ref_entries)
    ours_calls = [call for call in ours_calls if call]
    if len(ours_calls) != len(ref_calls):
        cmp.results[f"{task}/gates/num_calls"] = {"exact": False,
                                                   "error": f"{len(ours_calls)} calls vs reference {len(ref_calls)}"}
    for c, (ours, ref) in enumerate(zip(ours_calls, ref_calls)):
        if len(ours) != len(ref):
            cmp.results[f"{task}/gates/call{c}"] = {"exact": False,
                                                     "error": f"{len(ours)} decisions vs reference {len(ref)}"}
            continue
        for (_, decision), (ref_name, ref_ids_SK, ref_gates_SK) in zip(ours, ref):
            ids_SK, gates_SK = decision.expert_ids_SK, decision.gates_SK
            n = ids_SK.shape[0]
            if n < ref_ids_SK.shape[0]:
                rows = slice(0, n) if c == 0 else slice(-n, None)
                ref_ids_SK, ref_gates_SK = ref_ids_SK[rows], ref_gates_SK[rows]
            short = ref_name.replace("fused_encoder.", "")
            cmp.exact(f"{task}/gates/call{c}/{short}/expert_ids", ids_SK, ref_ids_SK)
            cmp.floats(f"{task}/gates/call{c}/{short}/gates", gates_SK, ref_gates_SK)


def _target_features(model: UniPerceiver, sets: dict, names: list[str], chunk: int,
                     cache: dict) -> tuple[dict, list]:
    """Encode each named set once per check: with drop path and gate noise off, eval and
    training mode give the same features, and the vocabulary is the slow part."""
    feats, decisions = {}, []
    for name in names:
        target_set = sets[name]
        key = (name, target_set.ids_NL.shape, int(target_set.ids_NL.sum()))
        if key not in cache:
            first = model.encode(target_set.slice(0, min(chunk, len(target_set))))
            cache[key] = (model.encode_targets(target_set, chunk_size=chunk), first.decisions)
        feats[name] = cache[key][0]
        decisions.append(cache[key][1])
    return feats, decisions


def check_bundle(bundle: dict, rtol: float = 1e-4, chunk: int = 8192, grad_chunk: int | None = None,
                 grad_tasks: list[str] | None = None) -> Comparison:
    """Compare everything the bundle holds. Gradients push the loss back through each target set
    in `grad_chunk` sequences at a time; None = the whole set in one batch, as the release's
    single-process training does: at 1e-4 the fp32 summation order over the 49,411-word
    vocabulary matters. `grad_tasks` restricts the gradient comparison to some tasks."""
    cmp = Comparison(rtol)
    cfg = bundle.get("config", {})
    overrides = ["drop_path=0.0", "moe.routing.noise=none"] if cfg.get("moe_type") else ["drop_path=0.0"]
    prompt = bundle.get("prompt")
    fc_tasks = (prompt or {}).get("fc_prompt_tasks", (cfg.get("prompt") or {}).get("fc_prompt_tasks"))
    if fc_tasks:
        overrides.append("prompt.fc_prompt_tasks=" + json.dumps(list(fc_tasks)))
    model, _ = convert_state_dict(bundle["state_dict"], "official", num_heads=cfg.get("num_heads"),
                                  overrides=overrides)
    if prompt is not None:
        _compare_trainable(cmp, model, prompt)
    settings = parse_official_tasks(bundle.get("official_config_yaml"))
    set_cache: dict = {}

    model.eval()
    with torch.no_grad():
        for task, raw in bundle.get("batches_eval", {}).items():
            batch = translate_batch(raw, settings.get(task), training=False)
            sets = shared_target_sets(raw)
            ref = bundle.get("eval", {}).get(task, {})
            io = bundle.get("encoder_io", {}).get(task)
            enc = model.encode(batch.inputs)  # the input call: encoder output and its decisions
            if io is not None:
                x_BLD, _, _ = model.embed_sequence(batch.inputs)
                cmp.floats(f"{task}/encoder_in", x_BLD, io["in"])
                if io.get("out") is not None:
                    cmp.floats(f"{task}/encoder_out", enc.hidden_BLD, io["out"])
            if batch.kind == "caption":
                s = settings.get(task)
                beams = bundle.get("eval_beams", {}).get(task, {})
                beam_size = int(beams.get("beam_size", s.beam_size if s else 2))
                len_penalty = float(beams.get("len_penalty", s.len_penalty if s else 0.0))
                max_len = int(beams.get("max_steps", s.max_len if s else 21))
                feats, set_calls = _target_features(model, sets, [batch.target_set], chunk, set_cache)
                out = beam_search(model, batch.inputs, batch.decode_attributes_SA, feats[batch.target_set],
                                  temperature=batch.temperature, beam_size=beam_size,
                                  max_len=max_len, len_penalty=len_penalty, record_decisions=True)
                if "G_SENTS_IDS" in ref:
                    cmp.exact(f"{task}/G_SENTS_IDS", out.ids_BT, ref["G_SENTS_IDS"])
                if "G_LOGP" in ref:
                    cmp.floats(f"{task}/G_LOGP", out.logprobs_BT, ref["G_LOGP"])
                if "G_SENTS_IDS" in beams:
                    cmp.exact(f"{task}/all_beams/G_SENTS_IDS", out.beam_ids_BKT, beams["G_SENTS_IDS"])
                if "G_LOGP" in beams:
                    cmp.floats(f"{task}/all_beams/G_LOGP", out.beam_logprobs_BKT, beams["G_LOGP"])
                # the release encodes the prefix, then the vocabulary, then the decoding steps
                calls = [out.decisions[0]] + set_calls + out.decisions[1:]
            elif batch.kind == "retrieval":
                out = run_task(model, batch)
                cmp.floats(f"{task}/input_feats", out.extras["input_feats"], ref["input_feats"])
                cmp.floats(f"{task}/tgt_feats", out.extras["target_feats"], ref["tgt_feats"])
                n_input = len(enc.decisions)  # out.decisions = input call + target call
                calls = [out.decisions[:n_input], out.decisions[n_input:]]
            else:
                feats, set_calls = _target_features(model, sets, [batch.target_set], chunk, set_cache)
                out = run_task(model, batch, feats)
                cmp.floats(f"{task}/logits", out.logits, ref["logits"])
                calls = [out.decisions] + set_calls
            if task in bundle.get("gates", {}):
                _compare_gates(cmp, task, calls, bundle["gates"][task])

    model.train()  # drop path and gate noise are off: training mode is deterministic
    for label, offsets_key in (("train_det", "train_det_temporal_offsets"), ("train_det_no_temporal_offset", None)):
        for task, ref_losses in bundle.get(label, {}).items():
            raw = bundle["batches_train"][task]
            batch = translate_batch(raw, settings.get(task), training=True)
            sets = shared_target_sets(raw)
            if offsets_key is not None:
                offsets = [o["offset"] for o in bundle.get(offsets_key, {}).get(task, [])]
            else:
                offsets = [0] * sum(s.modality != "text" for s in batch.inputs.segments)
            with torch.no_grad():
                feats = None
                if batch.target_set:
                    feats, _ = _target_features(model, sets, [batch.target_set], chunk, set_cache)
                out = run_task(model, batch, feats, temporal_offsets=offsets or None)
            ours = _official_loss_names(batch.kind, out)
            for name, value in ref_losses.items():
                if name == "null_loss":
                    continue
                if name not in ours:
                    cmp.results[f"{task}/{label}/{name}"] = {"max_abs": float("inf"), "max_rel": float("inf"),
                                                             "error": "no such quantity here"}
                    continue
                cmp.floats(f"{task}/{label}/{name}", ours[name], value)

    for task, ref_grads in (bundle.get("grads") or {}).items():
        if grad_tasks is not None and task not in grad_tasks:
            continue
        raw = bundle["batches_train"][task]
        batch = translate_batch(raw, settings.get(task), training=True)
        offsets = [o["offset"] for o in bundle.get("train_det_temporal_offsets", {}).get(task, [])]
        offsets = offsets or [0] * sum(s.modality != "text" for s in batch.inputs.segments)  # gradients: offset off
        seed = ((bundle.get("meta") or {}).get("spec") or {}).get("train_seed", 0)
        grads = _gradients(model, batch, shared_target_sets(raw), offsets or None, grad_chunk, seed)
        for name, ref in ref_grads.items():
            key = f"{task}/grad/{name}"
            ours = grads.get(name, "no such parameter here")
            if isinstance(ours, str):
                cmp.results[key] = {"max_abs": float("inf"), "max_rel": float("inf"), "error": ours}
            elif ref is None:  # unused by this task: no gradient, or an exactly zero one
                cmp.results[key] = {"exact": ours is None or not bool(ours.any()),
                                    **({} if ours is None or not bool(ours.any()) else
                                       {"error": "the reference has no gradient here"})}
            elif ours is None:
                cmp.results[key] = {"max_abs": float("inf"), "max_rel": float("inf"), "error": "no gradient here"}
            else:
                cmp.floats(key, ours.reshape(ref.shape) if ours.numel() == ref.numel() else ours, ref)
    return cmp


def _compare_trainable(cmp: Comparison, model: UniPerceiver, prompt: dict) -> None:
    """Freeze by the bundle's PROMPT_PARAM and compare the trainable set under official names
    (first names, shapes, every alias) and its size."""
    substrings = (prompt.get("switches") or {}).get("PROMPT_PARAM")
    if substrings is None:
        cmp.results["prompt/trainable"] = {"exact": False, "error": "the bundle gives no PROMPT_PARAM"}
        return
    ours = apply_trainable(model, list(substrings))
    params = dict(model.named_parameters())
    ours_official = {official_names(n, model)[0]: n for n in ours}
    ours_shapes = {o: list(params[n].shape) for o, n in ours_official.items()}
    ref_shapes = {name: list(shape) for name, shape in prompt.get("trainable", [])}
    missing, extra = sorted(set(ref_shapes) - set(ours_shapes)), sorted(set(ours_shapes) - set(ref_shapes))
    same = not missing and not extra and all(ours_shapes[k] == ref_shapes[k] for k in ref_shapes)
    cmp.results["prompt/trainable_set"] = {"exact": same, **({} if same else {
        "error": f"missing {missing} extra {extra} shapes differ "
                 f"{[k for k in ref_shapes if k in ours_shapes and ours_shapes[k] != ref_shapes[k]]}"})}
    if "trainable_numel" in prompt:
        numel = sum(params[n].numel() for n in ours)
        cmp.results["prompt/trainable_numel"] = {"exact": numel == int(prompt["trainable_numel"]), **(
            {} if numel == int(prompt["trainable_numel"]) else {"error": f"{numel} vs {prompt['trainable_numel']}"})}
    for first, aliases in (prompt.get("trainable_aliases") or {}).items():
        mine = official_names(ours_official[first], model) if first in ours_official else []
        cmp.results[f"prompt/aliases/{first}"] = {"exact": sorted(mine) == sorted(aliases), **(
            {} if sorted(mine) == sorted(aliases) else {"error": f"{mine} vs {aliases}"})}


def _gradients(model: UniPerceiver, batch, sets: dict, offsets: list[int] | None, chunk: int | None,
               seed: int) -> dict[str, Tensor | None]:
    """d(total training loss)/d(parameter) for every trainable parameter, keyed by official first
    name. The target set is encoded once without graph, its features made a leaf, and the loss's
    gradient with respect to them is then pushed back through the encoder (`chunk` sequences at
    a time; None = all at once)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    feats: dict[str, Tensor] = {}
    if batch.target_set:
        with torch.no_grad():
            feats[batch.target_set] = model.encode_targets(sets[batch.target_set], chunk_size=chunk)
        feats[batch.target_set].requires_grad_(True)
    out = run_task(model, batch, feats, temporal_offsets=offsets)
    out.loss.backward()
    if batch.target_set and feats[batch.target_set].grad is not None:
        target_set, grad_ND = sets[batch.target_set], feats[batch.target_set].grad
        step = len(target_set) if chunk is None else max(1, chunk)
        for start in range(0, len(target_set), step):
            stop = min(start + step, len(target_set))
            model.encode_targets(target_set.slice(start, stop)).backward(grad_ND[start:stop])
    grads = {official_names(n, model)[0]: (None if p.grad is None else p.grad.detach().clone())
             for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _official_loss_names(kind: str, out) -> dict[str, Tensor]:
    """Our loss/metric names -> the release's loss-dict names."""
    if kind == "retrieval":
        return {"LabelSmoothing (i2t)": out.losses["i2t"], "LabelSmoothing (t2i)": out.losses["t2i"],
                "Accuracy (i2t)": out.metrics["accuracy_i2t"], "Accuracy (t2i)": out.metrics["accuracy_t2i"]}
    loss = next(iter(out.losses.values()))
    return {"LabelSmoothing": loss, "CrossEntropy_Loss": loss, "Accuracy": out.metrics["accuracy"]}


def main(argv: list[str] | None = None) -> int:
    from .. import cli

    return cli.run(_check, argv, handles_help=True)  # 1: a quantity differs; 2: bad input


def _check(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver.tools.check_official", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--json", default=None, help="write every comparison here")
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--grad-chunk", type=int, default=None,
                        help="target sequences per backward chunk in the gradient check (default: the whole "
                             "set at once, as the release; smaller saves memory but changes fp32 summation order)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    from ..utils.io import load_checkpoint_file

    bundle = load_checkpoint_file(args.bundle)
    cmp = check_bundle(bundle, rtol=args.rtol, grad_chunk=args.grad_chunk)
    width = max(len(k) for k in cmp.results)
    worst = 0.0
    for key, r in cmp.results.items():
        if "exact" in r:
            line = "identical" if r["exact"] else f"DIFFERENT {r.get('error', '')}"
        else:
            worst = max(worst, r["max_rel"])
            line = f"max_abs {r['max_abs']:.3e}  max_rel {r['max_rel']:.3e}  {r.get('error', '')}"
        print(f"{key:<{width}}  {line}")
    failed = cmp.failed()
    print(f"\n{len(cmp.results)} quantities compared; worst relative error {worst:.3e} (limit {args.rtol:g}); "
          f"{len(failed)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bundle": args.bundle, "rtol": args.rtol, "worst_rel": worst,
                       "failed": failed, "quantities": cmp.results}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
