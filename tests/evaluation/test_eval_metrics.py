"""Ranking metrics against naive references: top-k with ties, recall@k with several ground
truths, chunked retrieval == the full similarity matrix."""
import pytest
import torch

from uniperceiver.evaluation.metrics import (
    best_correct_rank,
    hits_at_k,
    rank_of_label,
    retrieval_metrics,
    retrieval_ranks,
    topk_accuracy,
)


def naive_rank(scores: list[float], correct: set[int]) -> int:
    """Position of the first correct candidate after sorting by score, descending, with wrong
    candidates placed before correct ones on ties (the documented pessimistic rule)."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j in correct))
    return next(pos for pos, j in enumerate(order) if j in correct)


def naive_topk(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    hits = [naive_rank(row.tolist(), {int(y)}) < k for row, y in zip(scores, labels)]
    return 100.0 * sum(hits) / len(hits)


@pytest.mark.parametrize("seed", range(5))
def test_topk_matches_naive_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    # few distinct values -> many ties, also with the label
    scores = torch.randint(0, 4, (40, 7), generator=gen).float()
    labels = torch.randint(0, 7, (40,), generator=gen)
    acc = topk_accuracy(scores, labels, ks=(1, 2, 5))
    for k in (1, 2, 5):
        assert acc[f"top{k}"] == pytest.approx(naive_topk(scores, labels, k))


def test_tie_rule_is_pessimistic_and_order_free():
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.5, 0.5], [2.0, 1.0, 1.0]])
    labels = torch.tensor([0, 2, 1])
    # row 0: tied with one wrong class -> rank 1; row 1: all equal -> rank 2; row 2: tied -> rank 2
    assert rank_of_label(scores, labels).tolist() == [1, 2, 2]
    assert topk_accuracy(scores, labels, ks=(1, 2, 3)) == {"top1": 0.0, "top2": pytest.approx(100 / 3), "top3": 100.0}
    # permuting the candidates never changes a rank
    perm = torch.tensor([2, 0, 1])
    inv = torch.argsort(perm)
    assert rank_of_label(scores[:, perm], inv[labels]).tolist() == [1, 2, 2]


def test_several_ground_truths_best_rank():
    scores = torch.tensor([[0.9, 0.8, 0.95, 0.1], [0.2, 0.2, 0.2, 0.3]])
    correct = torch.tensor([[False, True, False, True], [True, True, False, False]])
    # row 0: best correct is 0.8, beaten by 0.9 and 0.95 -> rank 2
    # row 1: correct candidates tied with each other (0.2) never count; wrong 0.2 and 0.3 do -> 2
    assert best_correct_rank(scores, correct).tolist() == [2, 2]
    with pytest.raises(ValueError, match="no correct candidate"):
        best_correct_rank(scores, torch.zeros_like(correct))


def naive_retrieval(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor):
    sim = (img @ txt.t()).tolist()
    i2t = [naive_rank(sim[i], {t for t in range(len(owner)) if owner[t] == i}) for i in range(len(img))]
    t2i = [naive_rank([sim[i][t] for i in range(len(img))], {int(owner[t])}) for t in range(len(owner))]
    return torch.tensor(i2t), torch.tensor(t2i)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
@pytest.mark.parametrize("quantize", [False, True])
def test_chunked_retrieval_equals_naive(chunk, quantize):
    gen = torch.Generator().manual_seed(chunk)
    n_img = 9
    counts = torch.randint(1, 5, (n_img,), generator=gen)  # 1-4 captions per image
    owner = torch.repeat_interleave(torch.arange(n_img), counts)
    img = torch.nn.functional.normalize(torch.randn(n_img, 8, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(len(owner), 8, generator=gen), dim=-1)
    if quantize:  # coarse features: many exactly tied similarities
        img, txt = img.sign(), txt.sign()
    i2t, t2i = retrieval_ranks(img, txt, owner, chunk_size=chunk)
    ref_i2t, ref_t2i = naive_retrieval(img, txt, owner)
    assert i2t.tolist() == ref_i2t.tolist()
    assert t2i.tolist() == ref_t2i.tolist()
    metrics = retrieval_metrics(i2t, t2i)
    for k in (1, 5, 10):
        assert metrics[f"i2t_R@{k}"] == pytest.approx(100.0 * float((ref_i2t < k).float().mean()))
        assert metrics[f"t2i_R@{k}"] == pytest.approx(100.0 * float((ref_t2i < k).float().mean()))
    assert metrics["R_mean"] == pytest.approx(sum(v for k, v in metrics.items() if k != "R_mean") / 6)


def test_perfect_and_bad_inputs():
    img = torch.eye(4)
    txt = torch.cat([torch.eye(4), torch.eye(4)])  # two exact captions per image
    owner = torch.cat([torch.arange(4), torch.arange(4)])
    i2t, t2i = retrieval_ranks(img, txt, owner, chunk_size=2)
    assert i2t.tolist() == [0] * 4
    # each caption's image is unique at the top
    assert t2i.tolist() == [0] * 8
    with pytest.raises(ValueError, match="owners must index"):
        retrieval_ranks(img, txt, owner + 4)
    with pytest.raises(ValueError, match="outside the 3 candidates"):
        rank_of_label(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="empty"):
        hits_at_k(torch.zeros(0), (1,))
