"""Ranking metrics: top-k accuracy and retrieval recall@k, with one tie rule everywhere.

**Tie rule (pessimistic).** The rank of the ground truth is the number of *wrong* candidates
whose score is at least the score of the best *correct* candidate:

    rank = #{ j not correct : s_j >= max_{c correct} s_c }

and a sample is a hit at k when rank < k. A wrong candidate tied with the ground truth therefore
counts against it, and correct candidates tied with each other never do. The rule makes every
metric independent of the order of the candidates (class list, caption list) and of the sort
algorithm, and a degenerate model that scores everything equally gets 0, not 100. On real-valued
features exact ties do not occur, so the numbers equal those of the release's `argsort`/`topk`.

Metrics are percentages (0-100). Shape legend: X queries, N candidates, D feature width,
I images (or videos), T captions.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = [
    "best_correct_rank",
    "hits_at_k",
    "rank_of_label",
    "retrieval_metrics",
    "retrieval_ranks",
    "topk_accuracy",
]


def rank_of_label(scores_XN: Tensor, labels_X: Tensor) -> Tensor:
    """Rank of the single correct candidate per row under the pessimistic tie rule -> long [X]."""
    if scores_XN.dim() != 2 or labels_X.dim() != 1 or labels_X.shape[0] != scores_XN.shape[0]:
        raise ValueError(f"expected scores [X, N] and labels [X], got {tuple(scores_XN.shape)} "
                         f"and {tuple(labels_X.shape)}")
    labels_X = labels_X.to(scores_XN.device).long()
    n = scores_XN.shape[1]
    bad = (labels_X < 0) | (labels_X >= n)
    if bool(bad.any()):
        raise ValueError(f"labels {labels_X[bad][:5].tolist()} are outside the {n} candidates")
    correct_X1 = scores_XN.gather(1, labels_X[:, None])
    # every candidate >= the correct score, minus the correct candidate itself
    return (scores_XN >= correct_X1).sum(1) - 1


def best_correct_rank(scores_XN: Tensor, correct_XN: Tensor) -> Tensor:
    """Rank of the best-scoring correct candidate per row (several may be correct) -> long [X].

    Rows without any correct candidate are an error (their rank is undefined)."""
    if scores_XN.shape != correct_XN.shape:
        raise ValueError(f"scores {tuple(scores_XN.shape)} and mask {tuple(correct_XN.shape)} differ")
    correct_XN = correct_XN.to(scores_XN.device).bool()
    empty = ~correct_XN.any(1)
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten()[:5].tolist()
        raise ValueError(f"rows {rows} have no correct candidate")
    best_X1 = scores_XN.masked_fill(~correct_XN, float("-inf")).amax(1, keepdim=True)
    return ((scores_XN >= best_X1) & ~correct_XN).sum(1)


def hits_at_k(ranks_X: Tensor, ks: Iterable[int]) -> dict[int, float]:
    """Percentage of rows whose rank is < k, for each k."""
    ranks_X = torch.as_tensor(ranks_X)
    if ranks_X.numel() == 0:
        raise ValueError("no ranks to summarise (empty evaluation set)")
    return {k: 100.0 * float((ranks_X < k).double().mean()) for k in ks}


def topk_accuracy(scores_XN: Tensor, labels_X: Tensor, ks: Iterable[int] = (1, 5)) -> dict[str, float]:
    """{'top1': %, 'top5': %} (k larger than the number of classes is reported as is: 100)."""
    hits = hits_at_k(rank_of_label(scores_XN, labels_X), ks)
    return {f"top{k}": v for k, v in hits.items()}


@torch.no_grad()
def retrieval_ranks(
    input_feats_ID: Tensor,
    text_feats_TD: Tensor,
    owner_T: Tensor,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Image->text and text->image ranks, computing the [I, T] similarity in row chunks so that
    5k x 25k (COCO) never sits in memory at once.

    i2t: for image i the correct captions are those with owner i; its rank is the best over them
    (the release's RetrievalEvaler). t2i: caption t has one correct image, owner[t].
    Returns (i2t_ranks [I], t2i_ranks [T]).
    """
    n_img, n_txt = input_feats_ID.shape[0], text_feats_TD.shape[0]
    owner_T = owner_T.to(text_feats_TD.device).long()
    if owner_T.shape != (n_txt,):
        raise ValueError(f"owner must be [T={n_txt}], got {tuple(owner_T.shape)}")
    if n_txt and (int(owner_T.min()) < 0 or int(owner_T.max()) >= n_img):
        raise ValueError(f"caption owners must index the {n_img} inputs")
    step = max(1, int(chunk_size))
    img = input_feats_ID.to(text_feats_TD.device, text_feats_TD.dtype)
    i2t = []
    for start in range(0, n_img, step):
        rows = torch.arange(start, min(start + step, n_img), device=img.device)
        scores_XT = img[rows] @ text_feats_TD.t()
        i2t.append(best_correct_rank(scores_XT, owner_T[None, :] == rows[:, None]))
    t2i = []
    for start in range(0, n_txt, step):
        stop = min(start + step, n_txt)
        scores_XI = text_feats_TD[start:stop] @ img.t()
        t2i.append(rank_of_label(scores_XI, owner_T[start:stop]))
    empty = torch.zeros(0, dtype=torch.long, device=img.device)
    return (torch.cat(i2t) if i2t else empty).cpu(), (torch.cat(t2i) if t2i else empty).cpu()


def retrieval_metrics(i2t_ranks: Tensor, t2i_ranks: Tensor, ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """R@k in both directions and their mean ('R_mean', the rsum/6 of retrieval papers)."""
    ks = tuple(ks)
    out = {f"i2t_R@{k}": v for k, v in hits_at_k(i2t_ranks, ks).items()}
    out.update({f"t2i_R@{k}": v for k, v in hits_at_k(t2i_ranks, ks).items()})
    out["R_mean"] = sum(out.values()) / len(out)
    return out
