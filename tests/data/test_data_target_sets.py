"""Shared target sets: class names (with synonyms), the vocabulary, verbalisers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from uniperceiver.config import TargetSetConfig
from uniperceiver.data import DataError, build_target_set

EOT = 49407


def test_class_names_ids_and_padding(tmp_path: Path, tok) -> None:
    (tmp_path / "in1k.txt").write_text("tench\ngoldfish\ngreat white shark\n")
    src = build_target_set("ImageNet1k", TargetSetConfig(kind="class_names", file="in1k.txt"), tok,
                           data_root=str(tmp_path))
    assert len(src) == 3
    ts = src.get()
    assert ts.name == "ImageNet1k"
    assert ts.ids_NL.tolist() == [[1149, 634, EOT, 0], [40293, EOT, 0, 0], [830, 1579, 7980, EOT]]
    assert ts.padding_mask_NL.tolist() == [[False] * 3 + [True], [False] * 2 + [True] * 2, [False] * 4]
    assert ts.attributes_SA.tolist() == [[1, 0, 0, 1, 0, 1, 1, 0]]


def test_synonyms_drawn_per_seed(tok) -> None:
    cfg = TargetSetConfig(kind="class_names", names=["tench|tinca tinca", "goldfish|carassius auratus", "hen"])
    src = build_target_set("in22k", cfg, tok)
    first = src.get()
    assert first.ids_NL[0, :3].tolist() == [1149, 634, EOT]  # evaluation: the first synonym
    assert torch.equal(src.get(5).ids_NL, src.get(5).ids_NL)  # training: a function of the seed
    draws = {tuple(map(tuple, src.get(s).ids_NL.tolist())) for s in range(20)}
    assert len(draws) == 4  # 2 x 2 synonym combinations, all reached
    assert all(src.get(s).ids_NL[2, :2].tolist() == [8047, EOT] for s in range(3))


def test_vocabulary(tok) -> None:
    src = build_target_set("Vocab_Word", TargetSetConfig(kind="vocabulary"), tok)
    ts = src.get()
    assert len(src) == 49411 and ts.ids_NL.shape == (49411, 2)
    assert ts.ids_NL[0].tolist() == [0, EOT] and ts.ids_NL[49410].tolist() == [49410, EOT]
    assert torch.equal(ts.ids_NL[:, 0], torch.arange(49411)) and bool((ts.ids_NL[:, 1] == EOT).all())
    assert ts.attributes_SA.tolist() == [[1, 1, 0, 1, 0, 1, 1, 0]]
    seq = ts.slice(10, 20)
    assert seq.segments[0].data.shape == (10, 2)


def test_verbalizer(tok) -> None:
    src = build_target_set("SST-2-target", TargetSetConfig(kind="verbalizer", names=["bad", "wonderful"]), tok)
    ts = src.get(3)
    assert ts.ids_NL.tolist() == [tok.encode("bad <|endoftext|>"), tok.encode("wonderful <|endoftext|>")]
    assert ts.attributes_SA.tolist() == [[1, 1, 0, 1, 0, 1, 1, 0]]


def test_blank_class_line_is_an_error(tmp_path: Path, tok) -> None:
    (tmp_path / "c.txt").write_text("tench\n\ngoldfish\n")
    with pytest.raises(DataError, match=r"c\.txt:2: empty class name"):
        build_target_set("x", TargetSetConfig(kind="class_names", file=str(tmp_path / "c.txt")), tok)
