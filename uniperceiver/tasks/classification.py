"""Classification against a target set: image/video classes, and text classification with
verbalisers (the prediction is read at the `<|spe|>` of the prompt). The prediction is the
candidate whose [SPE] feature is most similar; evaluation scores top-1/top-5 and averages the
softmax over the views of a sample (K400: 4 clips x 3 crops).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..evaluation.evaluators import EvalInputError, Evaluator, TaskResult, eval_labels
from ..evaluation.metrics import hits_at_k, rank_of_label
from ..modeling.attributes import TEXT_INPUT, VISUAL_INPUT
from ..modeling.batch import Segment, TaskBatch
from ..modeling.model import UniPerceiver
from ..tokenization import pad_ids
from .base import TaskOutput
from .losses import accuracy, cross_entropy
from ..utils.task_registry import TaskSpec, kind_spec, task_spec


def classify(
    model: UniPerceiver, batch: TaskBatch, target_feats_ND: Tensor, temporal_offsets: list[int] | None = None
) -> TaskOutput:
    enc = model.encode(batch.inputs, temporal_offsets=temporal_offsets)
    if kind_spec(batch.kind).prompt_spe:  # text classification: the prompt's <|spe|>
        if batch.spe_index is None:
            raise ValueError(f"task {batch.task}: text classification needs spe_index")
        rows = torch.arange(batch.inputs.batch_size, device=enc.hidden_BLD.device)
        # +1: the text segment starts after [SPE]
        hidden_BD = enc.hidden_BLD[rows, batch.spe_index.to(rows.device) + 1]
    else:
        hidden_BD = enc.hidden_BLD[:, 0]
    raw_BD = model.predictor.project_raw(hidden_BD)
    logits_BN = model.logits(F.normalize(raw_BD.float(), dim=-1), target_feats_ND, batch.temperature)
    if kind_spec(batch.kind).fc_prompt and model.uses_fc_prompt(batch.task):
        logits_BN = model.predictor.add_fc_prompt(logits_BN, raw_BD, batch.task)
    out = TaskOutput(logits=logits_BN, decisions=enc.decisions)
    if batch.labels is not None:
        labels = batch.labels.to(logits_BN.device)
        out.losses["cls"] = batch.loss_weight * cross_entropy(logits_BN, labels, batch.label_smoothing)
        out.metrics["accuracy"] = accuracy(logits_BN, labels)
    return out


def collate_visual(c: Any, samples: list[dict[str, Any]]) -> TaskBatch:
    """Visual segment [B, T, 3, S, S], `labels` [B]. Multi-view video evaluation ([V, T, ...] per
    sample) flattens to B*V rows, sample-major, labels repeated per view, `meta['views'] = V`."""
    seg, views = c.visual(samples)
    labels = torch.tensor(c.need(samples, "label"), dtype=torch.long)
    meta: dict[str, Any] = {"views": views}
    if views > 1:
        meta["sample_labels"] = labels
        labels = labels.repeat_interleave(views)
    return c.batch(samples, c.seq([seg]), labels=labels, target_set=c.task.target_set, meta=meta)


def collate_text(c: Any, samples: list[dict[str, Any]]) -> TaskBatch:
    """Text ids [B, L], `spe_index` [B] (position of `<|spe|>` in the text), `labels` [B]."""
    ids, mask = pad_ids(c.need(samples, "ids"))
    return c.batch(
        samples,
        c.seq([Segment("text", ids, mask)]),
        labels=torch.tensor(c.need(samples, "label"), dtype=torch.long),
        spe_index=torch.tensor(c.need(samples, "spe_index"), dtype=torch.long),
        target_set=c.task.target_set,
    )


class ClassificationEvaluator(Evaluator):
    """Top-1/top-5 of the label among the target set (pessimistic ties, see metrics.py)."""

    def check_dataset(self, dataset: Any) -> None:
        n_set = len(self.target_set) if self.target_set is not None else 0
        n_data = getattr(dataset, "num_classes", None)
        if n_data is not None and int(n_data) != n_set:
            raise EvalInputError(
                f"task {self.task.name!r}: the class-name target set {self.task.target_set!r} "
                f"({self.target_source}) has {n_set} entries, but the dataset has {n_data} classes; "
                f"expected {n_data} class names, one per line in label order"
            )

    @torch.no_grad()
    def process(self, indices: list[int], infos: list[dict], batch: TaskBatch) -> list[tuple[int, Any]]:
        feats_ND = self.target_features()
        out = classify(self.model, replace(batch, labels=None), feats_ND)
        logits_XN = out.logits.float()
        b, n = len(indices), feats_ND.shape[0]
        if logits_XN.shape[0] % b:
            raise EvalInputError(f"task {self.task.name!r}: {logits_XN.shape[0]} input rows for {b} samples")
        views = logits_XN.shape[0] // b
        video = task_spec(self.task.type).modality == "video"
        expected_views = self.task.eval_clips * self.task.eval_crops if video else 1
        if views != expected_views:
            raise EvalInputError(
                f"task {self.task.name!r}: the collate gave {views} views per sample, but eval_clips x "
                f"eval_crops = {expected_views}"
            )
        if views > 1:
            # The release averages softmax probabilities over the views (clips x crops).
            scores_BN = logits_XN.softmax(-1).view(b, views, n).mean(1)
        else:
            scores_BN = logits_XN
        labels_B = eval_labels(self.task, infos, batch, b)
        bad = [(info.get("id", idx), int(lab)) for idx, info, lab in zip(indices, infos, labels_B) if not 0 <= lab < n]
        if bad:
            sid, lab = bad[0]
            raise EvalInputError(
                f"task {self.task.name!r}: sample {sid!r} has label {lab}, but the class-name target set "
                f"{self.task.target_set!r} ({self.target_source}) has only {n} entries; expected at least "
                f"{lab + 1} class names"
            )
        ranks = rank_of_label(scores_BN, labels_B.to(scores_BN.device)).cpu()
        top = scores_BN.topk(min(5, n), dim=-1).indices.cpu()
        return [(idx, {"rank": int(r), "top5": t.tolist()}) for idx, r, t in zip(indices, ranks, top)]

    def summarize(self, records: list[Any]) -> TaskResult:
        ranks = torch.tensor([r["rank"] for r in records])
        metrics = {f"top{k}": v for k, v in hits_at_k(ranks, (1, 5)).items()}
        return TaskResult(metrics)


def chance(metric: str, classes: int, samples: int) -> float | None:
    """top-k: k of the N classes."""
    if not metric.startswith("top") or classes <= 0:
        return None
    head = metric[3:].split("_")[0]
    k = int(head) if head.isdigit() else 1
    return 100.0 * min(k, classes) / classes


_COMMON = dict(forward=classify, evaluator=ClassificationEvaluator, class_labels=True, chance=chance)
SPECS = (
    TaskSpec("image_classification", "classification", "image", {"input": (VISUAL_INPUT,)}, "img_cls",
             formats=("imagenet", "imagenet22k", "jsonl", "demo"), collate=collate_visual,
             target_sets=("class_names",), mixup=True, fc_prompt=True, image_pipeline="imagenet", **_COMMON),
    TaskSpec("video_classification", "classification", "video", {"input": (VISUAL_INPUT,)}, "video_cls",
             formats=("kinetics", "jsonl", "demo"), collate=collate_visual,
             target_sets=("class_names",), mixup=True, fc_prompt=True, image_pipeline="imagenet", **_COMMON),
    TaskSpec("text_classification", "text_classification", "text", {"input": (TEXT_INPUT,)}, "downstream",
             formats=("glue", "jsonl", "demo"), collate=collate_text, target_sets=("verbalizer", "class_names"),
             prompt_spe=True, image_pipeline="imagenet", **_COMMON),
)
