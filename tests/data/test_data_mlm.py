"""MLM whole-word masking: rates, the 80/10/10 split and labels."""
from __future__ import annotations

import random
from pathlib import Path

from conftest import task
from uniperceiver.config import DataSourceConfig
from uniperceiver.data import build_dataset
from uniperceiver.data.text import mask_words, split_words


def test_mask_words_statistics() -> None:
    random.seed(0)
    words = [[1000 + i, 2000 + i] if i % 3 == 0 else [1000 + i] for i in range(20000)]
    ids, labels = mask_words(words, 0.15)
    assert len(ids) == len(labels) == sum(len(w) for w in words)
    picked = masked = randomised = kept = 0
    pos = 0
    for w in words:
        lab = labels[pos:pos + len(w)]
        got = ids[pos:pos + len(w)]
        pos += len(w)
        if lab[0] == -1:
            assert lab == [-1] * len(w) and got == w  # unpicked words are untouched
            continue
        picked += 1
        assert lab == w  # labels: the original ids of the whole word
        if got == [49410] * len(w):
            masked += 1
        elif got == w:
            kept += 1
        else:
            randomised += 1
    assert abs(picked / len(words) - 0.15) < 0.01
    assert abs(masked / picked - 0.8) < 0.03
    assert abs(randomised / picked - 0.1) < 0.025
    assert abs(kept / picked - 0.1) < 0.025


def test_corpus_masking_rate_and_truncation(tmp_path: Path, tok) -> None:
    rng = random.Random(0)
    vocab = "apple river stone cloud music paper window garden silver yellow".split()
    lines = [" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 30))) for _ in range(200)]
    (tmp_path / "c.txt").write_text("\n".join(lines))
    t = task("text_mlm", max_text_len=128)
    t.train_data = DataSourceConfig(format="mlm_corpus", annotations=str(tmp_path / "c.txt"))
    ds = build_dataset(t, "train", tok)
    picked_ids = total = 0
    for i in range(len(ds)):
        s = ds[(i, 1000 + i)]
        assert len(s["ids"]) == len(s["mlm_labels"]) <= 128
        assert s["ids"][-1] == tok.EOT or s["mlm_labels"][-1] == tok.EOT  # the last id is kept
        total += len(s["ids"])
        picked_ids += sum(lab != -1 for lab in s["mlm_labels"])
    assert abs(picked_ids / total - 0.15) < 0.02  # one id per word in this vocabulary
    assert ds[(3, 5)] == ds[(3, 5)]  # reproducible
    # evaluation (plain index): masked, and fixed per sample
    t.eval_data = DataSourceConfig(format="mlm_corpus", annotations=str(tmp_path / "c.txt"))
    ev = build_dataset(t, "eval", tok)
    assert ev[4] == ev[4] and any(lab != -1 for lab in ev[4]["mlm_labels"])


def test_split_words_groups_bpe_pieces(tok) -> None:
    words = split_words(tok, "Abseiling, it's <|endoftext|>")
    assert [tok.decode(w) for w in words] == ["abseiling ", ", ", "it ", "'s ", "<|endoftext|>"]
    assert words[0] == [596, 567, 3299]  # a multi-piece word ('ab', 'se', 'iling') stays one word
