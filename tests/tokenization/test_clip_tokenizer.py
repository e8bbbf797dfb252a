"""Tests for the CLIP BPE tokenizer (ids checked against the original Uni-Perceiver)."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest
import torch

from uniperceiver.tokenization import ClipTokenizer


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    # Loading parses ~49k merges; share one instance across the module.
    return ClipTokenizer()


# Callers append " <|endoftext|>" before encoding; ids from the original.
@pytest.mark.parametrize(
    "name, ids",
    [
        # ImageNet class names
        ("tench", [1149, 634, 49407]),
        ("goldfish", [40293, 49407]),
        ("great white shark", [830, 1579, 7980, 49407]),
        ("tiger shark", [6531, 7980, 49407]),
        ("hammerhead shark", [15331, 1375, 7980, 49407]),
        ("electric ray", [5031, 3077, 49407]),
        ("stingray", [43229, 49407]),
        ("rooster", [30926, 49407]),
        ("hen", [8047, 49407]),
        ("ostrich", [47640, 49407]),
        # Kinetics-400 class names
        ("abseiling", [596, 567, 3299, 49407]),
        ("air drumming", [1922, 35480, 49407]),
        ("answering questions", [18280, 3883, 49407]),
        ("applauding", [24713, 796, 49407]),
        ("applying cream", [17965, 3867, 49407]),
    ],
)
def test_class_name_ids(tok: ClipTokenizer, name: str, ids: list[int]) -> None:
    assert tok.encode(name + " <|endoftext|>") == ids
    assert tok.encode_texts([name]) == [ids]


def test_decode_matches_original_beam_outputs(tok: ClipTokenizer) -> None:
    assert (
        tok.decode([7484, 49324, 1053, 7242, 7484, 22777])
        == "fineartexalfacspectacfineartstaircase "
    )
    assert tok.decode([24277, 49324, 49324, 49324, 24277, 24277]) == "frightexalexalexalfrightfright"


def test_decode_accepts_tensor_and_stops_at_eot(tok: ClipTokenizer) -> None:
    ids = [1149, 634, 49407, 830, 49407]
    t = torch.tensor(ids)
    assert tok.decode(t) == tok.decode(ids) == "tench <|endoftext|>great <|endoftext|>"
    assert tok.decode(t, stop_at_eot=True) == "tench "
    assert tok.decode([49407, 1149], stop_at_eot=True) == ""
    assert tok.decode([1149, 634], stop_at_eot=True) == "tench "
    with pytest.raises(ValueError):
        tok.decode(torch.tensor([[1149, 634]]))
    with pytest.raises(ValueError):
        tok.decode([-1])
    with pytest.raises(ValueError):
        tok.decode([49411])


def test_constants_and_vocab(tok: ClipTokenizer) -> None:
    assert len(tok) == 49411 == ClipTokenizer.vocab_size
    assert (tok.SOT, tok.EOT, tok.MASK, tok.GEN, tok.SPE) == (49406, 49407, 49408, 49409, 49410)
    specials = ["<|startoftext|>", "<|endoftext|>", "<|mask|>", "<|gen|>", "<|spe|>"]
    assert tok.convert_tokens_to_ids(specials) == list(range(49406, 49411))
    assert tok.convert_ids_to_tokens(range(49406, 49411)) == specials
    # Last of the 48,894 merges ("jekyl" + "l</w>") is id 49405.
    assert tok.convert_ids_to_tokens([49405]) == ["jekyll</w>"]
    assert tok.encode("jekyll") == [49405]
    # First byte symbols / first merge.
    assert tok.convert_ids_to_tokens([0, 256, 512]) == ["!", "!</w>", "in"]
    with pytest.raises(KeyError, match="not in the CLIP vocabulary"):
        tok.convert_tokens_to_ids(["no-such-token"])


def test_special_tokens_in_text(tok: ClipTokenizer) -> None:
    assert tok.encode("<|endoftext|>") == [49407]
    assert tok.encode("<|startoftext|>") == [49406]
    assert tok.encode("<|gen|>") == [49409]
    ids = tok.encode("a <|spe|> b")
    assert ids == [320, 49410, 321]
    # Specials are matched even without surrounding spaces, and case-folded.
    assert tok.encode("a<|SPE|>b") == [320, 49410, 321]
    assert tok.tokenize("x <|spe|> <|endoftext|>") == ["x</w>", "<|spe|>", "<|endoftext|>"]


def test_mask_string_is_not_a_special_in_text(tok: ClipTokenizer) -> None:
    # As in the original: <|mask|> has an id but is missing from the
    # pre-tokenisation regex, so in text it becomes ordinary pieces.
    assert tok.tokenize("<|mask|>") == ["<", "|</w>", "mask</w>", "|", "></w>"]
    assert tok.encode("<|mask|>") == [27, 347, 8306, 91, 285]
    assert ClipTokenizer.MASK not in tok.encode("a <|mask|> b")
    assert tok.convert_tokens_to_ids(["<|mask|>"]) == [49408]
    assert tok.decode([49408]) == "<|mask|>"


@pytest.mark.parametrize(
    "text, ids, decoded",
    [
        ("Hello,   World! 123", [3306, 267, 1002, 256, 272, 273, 274], "hello , world ! 1 2 3 "),
        (
            "  It's a DOG's life:\tcafé & crème brûlée  ",
            [585, 568, 320, 1929, 568, 970, 281, 15304, 261, 1075, 12138, 614, 711, 127, 119, 75, 13489],
            "it 's a dog 's life : café & crème brûlée ",
        ),
        (
            "Zoë   went to 東京 😀 twice",
            [4397, 40520, 2437, 531, 48338, 21078, 361, 7334, 6970],
            "zoë went to 東京 😀 twice ",
        ),
        # Double-escaped HTML entities are unescaped twice.
        ("&amp;lt;tag&amp;gt; x", [283, 3640, 285, 343], "< tag > x "),
    ],
)
def test_round_trip(tok: ClipTokenizer, text: str, ids: list[int], decoded: str) -> None:
    assert tok.encode(text) == ids
    assert tok.decode(ids) == decoded
    assert tok.convert_tokens_to_ids(tok.tokenize(text)) == ids
    # Up to spacing, decoding restores the cleaned, lower-cased text.
    squash = lambda s: re.sub(r"\s+", "", s)  # noqa: E731
    assert squash(tok.decode(ids)) == squash(text.replace("&amp;lt;", "<").replace("&amp;gt;", ">").lower())


def test_empty_and_whitespace_text(tok: ClipTokenizer) -> None:
    assert tok.encode("") == []
    assert tok.encode(" \t\n ") == []
    assert tok.encode_texts(["", "  "]) == [[49407], [49407]]
    assert tok.encode_texts([""], append_eot=False) == [[]]


def test_batch_encode_pads_right(tok: ClipTokenizer) -> None:
    ids, mask = tok.batch_encode(["tench", "great white shark", ""], pad_id=0)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.tolist() == [
        [1149, 634, 49407, 0],
        [830, 1579, 7980, 49407],
        [49407, 0, 0, 0],
    ]
    assert mask.tolist() == [
        [False, False, False, True],
        [False, False, False, False],
        [False, True, True, True],
    ]
    ids, mask = tok.batch_encode(["tench", "hen"], append_eot=False, pad_id=-1)
    assert ids.tolist() == [[1149, 634], [8047, -1]]
    assert mask.tolist() == [[False, False], [False, True]]
    ids, mask = tok.batch_encode([])
    assert ids.shape == mask.shape == (0, 0)


def test_truncation_keeps_last_id(tok: ClipTokenizer) -> None:
    full = tok.encode("a b c d e <|endoftext|>")
    assert full == [320, 321, 322, 323, 324, 49407]
    assert tok.encode_texts(["a b c d e"], max_len=3) == [[320, 321, 49407]]
    assert tok.encode_texts(["a b c d e"], max_len=1) == [[49407]]
    assert tok.encode_texts(["a b c d e"], max_len=6) == [full]
    assert tok.encode_texts(["a b c d e"], max_len=3, append_eot=False) == [[320, 321, 324]]
    ids, mask = tok.batch_encode(["a b c d e", "hen"], max_len=4)
    assert ids.tolist() == [[320, 321, 322, 49407], [8047, 49407, 0, 0]]
    assert mask.tolist() == [[False] * 4, [False, False, True, True]]
    with pytest.raises(ValueError):
        tok.encode_texts(["a"], max_len=0)
    with pytest.raises(TypeError):
        tok.encode_texts("not a list")  # type: ignore[arg-type]


def test_cache_is_per_instance(tok: ClipTokenizer) -> None:
    tok.encode("xylophone")
    other = ClipTokenizer(tok.bpe_path)
    assert other._cache is not tok._cache
    assert "xylophone</w>" not in other._cache and "xylophone" not in other._cache
    assert other.encode("xylophone") == tok.encode("xylophone")


def test_missing_bpe_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "bpe_simple_vocab_16e6.txt.gz"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        ClipTokenizer(missing)


def test_corrupt_bpe_file_names_path(tmp_path: Path) -> None:
    not_gzip = tmp_path / "garbage.txt.gz"
    not_gzip.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match=re.escape(str(not_gzip))):
        ClipTokenizer(str(not_gzip))
    too_short = tmp_path / "short.txt.gz"
    too_short.write_bytes(gzip.compress(b"#version: 0.2\ni n\nt h\n"))
    with pytest.raises(ValueError, match=re.escape(str(too_short))):
        ClipTokenizer(too_short)
