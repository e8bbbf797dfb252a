"""One evaluator per task formulation (OFFICIAL.md 4.3).

An evaluator turns each collated eval batch into one record per sample (`process`), and turns the
records of the whole set, in sample-index order, into metrics (`summarize`). Records hold only
what the metric needs (a rank, a caption, features), so gathering them across ranks is cheap and
the metrics cannot depend on how the samples were batched or sharded.

- classification (image, video, text): logits against the target set; several views of a sample
  (K400: 4 clips x 3 crops) average their softmax probabilities; top-1 / top-5.
- retrieval (image, video): [SPE] features of every input and of every one of its captions;
  R@1/5/10 both ways over the whole set, the similarity computed in chunks.
- caption: beam search with the key/value cache over the vocabulary features (encoded once per
  run); BLEU/METEOR/ROUGE-L/CIDEr(/SPICE) through pycocoevalcap.
- mlm: top-1 accuracy over the masked positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..config.schema import TaskConfig
from ..modeling.attributes import task_attributes
from ..modeling.batch import TargetSet, TaskBatch
from ..modeling.model import UniPerceiver
from ..tasks import beam_search, classify, retrieve
from ..tasks.captioning import EOT_ID
from .caption_metrics import SCORERS, caption_metrics, check_caption_tools
from .metrics import hits_at_k, rank_of_label, retrieval_metrics, retrieval_ranks
from .target_features import TargetFeatures

__all__ = [
    "CaptionEvaluator",
    "ClassificationEvaluator",
    "EvalInputError",
    "Evaluator",
    "MLMEvaluator",
    "RetrievalEvaluator",
    "TaskResult",
    "evaluator_for",
]


class EvalInputError(ValueError):
    """Bad evaluation input (checkpoint, target set, data); the message names the file and what
    was expected."""


@dataclass
class TaskResult:
    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)
    # per-sample outputs worth saving (captions), in sample-index order
    predictions: list[dict[str, Any]] | None = None


@dataclass
class Evaluator:
    """Base: the task, the model, and (for shared-set tasks) its target set and feature store."""

    task: TaskConfig
    model: UniPerceiver
    target_set: TargetSet | None = None
    target_source: str = ""  # where the set came from, for error messages (file or 'inline names')
    features: TargetFeatures | None = None
    chunk_size: int = 4096

    def check_dataset(self, dataset: Any) -> None:
        """Consistency checks before the (expensive) loop."""

    def process(self, indices: list[int], infos: list[dict], batch: TaskBatch) -> list[tuple[int, Any]]:
        raise NotImplementedError

    def summarize(self, records: list[Any]) -> TaskResult:
        raise NotImplementedError

    def target_features(self) -> Tensor:
        if self.target_set is None or self.features is None:
            raise EvalInputError(f"task {self.task.name!r} ({self.task.type}) needs a target set")
        return self.features.get(self.target_set)


def _labels(task: TaskConfig, infos: list[dict], batch: TaskBatch, b: int) -> Tensor:
    if all("label" in i for i in infos):
        return torch.tensor([int(i["label"]) for i in infos], dtype=torch.long)
    if batch.labels is not None and batch.labels.dim() == 1:
        labels = batch.labels.cpu().long()
        return labels if labels.shape[0] == b else labels.view(b, -1)[:, 0]
    raise EvalInputError(f"task {task.name!r}: eval samples carry no 'label'")


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
        expected_views = self.task.eval_clips * self.task.eval_crops if self.task.type == "video_classification" else 1
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
        labels_B = _labels(self.task, infos, batch, b)
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


class RetrievalEvaluator(Evaluator):
    """R@1/5/10 image->text (best rank over the image's captions) and text->image."""

    @torch.no_grad()
    def process(self, indices: list[int], infos: list[dict], batch: TaskBatch) -> list[tuple[int, Any]]:
        b = len(indices)
        if batch.targets is None or batch.target_owner is None:
            raise EvalInputError(f"task {self.task.name!r}: eval batches need every caption of each input "
                                 "(targets + target_owner)")
        out = retrieve(self.model, batch)
        inp_BD = out.extras["input_feats"].float().cpu()
        txt_ND = out.extras["target_feats"].float().cpu()
        if inp_BD.shape[0] != b:
            raise EvalInputError(f"task {self.task.name!r}: {inp_BD.shape[0]} input rows for {b} samples "
                                 "(multi-view retrieval is not supported)")
        owner_N = batch.target_owner.cpu().long()
        records = []
        for i, idx in enumerate(indices):
            mine = txt_ND[owner_N == i]
            if mine.shape[0] == 0:
                sid = infos[i].get("id", idx) if i < len(infos) else idx
                raise EvalInputError(f"task {self.task.name!r}: sample {sid!r} has no captions")
            records.append((idx, {"input": inp_BD[i].clone(), "texts": mine.clone()}))
        return records

    def summarize(self, records: list[Any]) -> TaskResult:
        device = next(self.model.parameters()).device
        inputs_ID = torch.stack([r["input"] for r in records]).to(device)
        texts_TD = torch.cat([r["texts"] for r in records]).to(device)
        owner_T = torch.cat([torch.full((r["texts"].shape[0],), i, dtype=torch.long)
                             for i, r in enumerate(records)]).to(device)
        i2t, t2i = retrieval_ranks(inputs_ID, texts_TD, owner_T, self.chunk_size)
        return TaskResult(retrieval_metrics(i2t, t2i),
                          notes=[f"{inputs_ID.shape[0]} inputs, {texts_TD.shape[0]} captions"])


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
        predictions = [{"id": _jsonable(r["id"]), "caption": r["caption"]} for r in records]
        return TaskResult(metrics, notes, predictions)


class MLMEvaluator(Evaluator):
    """Top-1 accuracy of the masked words over the vocabulary (pessimistic ties)."""

    @torch.no_grad()
    def process(self, indices: list[int], infos: list[dict], batch: TaskBatch) -> list[tuple[int, Any]]:
        vocab_VD = self.target_features()
        if batch.labels is None:
            raise EvalInputError(f"task {self.task.name!r}: MLM eval batches need labels")
        assert self.target_set is not None
        batch = batch.with_vocabulary_rows(self.target_set)  # token ids -> rows of a vocabulary subset
        enc = self.model.encode(batch.inputs)
        labels_BL = batch.labels.to(enc.hidden_BLD.device)
        records = []
        for i, idx in enumerate(indices):
            masked = labels_BL[i] != -1
            if not bool(masked.any()):
                records.append((idx, (0, 0)))
                continue
            hidden_XD = enc.hidden_BLD[i, 1 : 1 + labels_BL.shape[1]][masked]
            logits_XV = self.model.logits(self.model.features(hidden_XD), vocab_VD, batch.temperature)
            correct = int((rank_of_label(logits_XV, labels_BL[i][masked]) == 0).sum())
            records.append((idx, (correct, int(masked.sum()))))
        return records

    def summarize(self, records: list[Any]) -> TaskResult:
        correct = sum(c for c, _ in records)
        total = sum(t for _, t in records)
        if total == 0:
            raise EvalInputError(f"task {self.task.name!r}: no masked tokens in the evaluation set")
        return TaskResult({"accuracy": 100.0 * correct / total}, notes=[f"{total} masked tokens"])


_EVALUATORS: dict[str, type[Evaluator]] = {
    "image_classification": ClassificationEvaluator,
    "video_classification": ClassificationEvaluator,
    "text_classification": ClassificationEvaluator,
    "image_retrieval": RetrievalEvaluator,
    "video_retrieval": RetrievalEvaluator,
    "image_caption": CaptionEvaluator,
    "video_caption": CaptionEvaluator,
    "text_mlm": MLMEvaluator,
}


def evaluator_for(task: TaskConfig, **kwargs: Any) -> Evaluator:
    try:
        cls = _EVALUATORS[task.type]
    except KeyError:
        raise EvalInputError(f"task {task.name!r}: no evaluator for task type {task.type!r}") from None
    extra = {k: kwargs.pop(k) for k in ("tokenizer", "spice", "scorers") if k in kwargs}
    ev = cls(task=task, **kwargs)
    for k, v in extra.items():
        setattr(ev, k, v)
    return ev


def _jsonable(x: Any) -> Any:
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return str(x)
