"""The embedded demo data: packaged files, split rules, dataset samples, and prepare.py's helpers
(on tiny synthetic inputs: the Debian packages are not needed)."""
from __future__ import annotations

import gzip
import hashlib
import json
import random

import numpy as np
import pytest
import torch

from uniperceiver.config.model import ModelConfig
from uniperceiver.config.schema import DataSourceConfig, TaskConfig
from uniperceiver.data.datasets.demo import build_demo_dataset
from uniperceiver.data.errors import DataError
from uniperceiver.data import demo_files as df
from uniperceiver.tools.maintainer import prepare_demo_data as prepare
from uniperceiver.tokenization import ClipTokenizer

EOT, SPE = 49407, 49410
DATA = df.demo_data_dir()
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def emoji() -> dict:
    return df.load_emoji()


def task(type_: str, **kw) -> TaskConfig:
    kw.setdefault("target_set", "t")
    return TaskConfig(name="demo_test", type=type_, **kw)


def source(**options) -> DataSourceConfig:
    return DataSourceConfig(format="demo", options=options)


def build(type_, split, tok=None, task_kw=None, **options):
    return build_demo_dataset(task(type_, **(task_kw or {})), source(**options), split, tok, ModelConfig(image_size=64))


# ----------------------------------------------------------------------------- packaged files
def test_packaged_files_exist_small_and_match_manifest():
    manifest = json.loads((DATA / "manifest.json").read_text())
    total = 0
    for name, entry in manifest["files"].items():
        data = (DATA / name).read_bytes()
        assert len(data) == entry["bytes"], name
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{name} differs from manifest.json"
        total += len(data)
    expected = {"emoji.npz", "fashion_mnist.npz", "wordnet_glosses.tsv", "LICENSES.md", "emoji_groups.txt",
                "emoji_subgroups.txt", "fashion_mnist_classes.txt", "wordnet_lexnames.txt"}
    assert expected <= set(manifest["files"])
    assert total <= 3_200_000  # the shipped subset stays small (about 3 MB)
    licenses = (DATA / "LICENSES.md").read_text()
    for needle in ("Open Font License", "Unicode", "Zalando", "Princeton University", "WordNet 3.0 Copyright 2006"):
        assert needle in licenses


def test_emoji_arrays(emoji):
    n = len(emoji["images"])
    assert 1500 < n < 4000
    assert emoji["images"].dtype == np.uint8 and emoji["images"].shape == (n, 32, 32, 3)
    assert len(emoji["group_names"]) == 9 and len(emoji["subgroup_names"]) == 99
    assert emoji["group"].min() == 0 and emoji["group"].max() == 8
    assert emoji["subgroup"].max() < 99
    # every subgroup lies in one group, consistently with the per-emoji group
    assert (emoji["subgroup_group"][emoji["subgroup"]] == emoji["group"]).all()
    names = [str(x) for x in emoji["names"]]
    assert names[0] == "grinning face" and len(set(names)) == n  # unique captions
    assert not emoji["skin_tone"].any()  # packaged without skin-tone variants
    # white background: corners are white, the glyph is not
    assert (emoji["images"][:, 0, 0] == 255).all()
    drawn = (emoji["images"] < 250).any(-1).reshape(n, -1).sum(1)
    assert drawn.min() >= 32  # something is drawn on every image (small squares: ~64 pixels)


def test_fashion_mnist_arrays():
    fm = df.load_fashion_mnist()
    for split, n in (("train", 1500), ("test", 500)):
        x, y = fm[f"{split}_images"], fm[f"{split}_labels"]
        assert x.dtype == np.uint8 and x.shape == (n, 28, 28)
        assert np.bincount(y, minlength=10).tolist() == [n // 10] * 10  # stratified
        assert len(np.unique(fm[f"{split}_source_index"])) == n
    assert [str(c) for c in fm["class_names"]] == df.demo_class_names("fashion_mnist")


def test_class_name_files():
    assert df.demo_class_names("fashion_mnist") == [
        "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
    assert df.demo_class_names("emoji", "group") == [
        "smileys and emotion", "people and body", "animals and nature", "food and drink", "travel and places",
        "activities", "objects", "symbols", "flags"]
    sub = df.demo_class_names("emoji", "subgroup")
    assert len(sub) == 99 and sub[0] == "face smiling" and "sky and weather" in sub
    lex = df.demo_class_names("wordnet")
    assert len(lex) == 26 and lex[:3] == ["top concept", "act", "animal"] and lex[-1] == "time"
    for names in (sub, lex):
        assert len(set(names)) == len(names)
    assert df.class_names_path("emoji", "group").parent == DATA
    with pytest.raises(ValueError, match="no class names"):
        df.class_names_path("emoji", "colour")


def test_readable_names():
    assert df.readable_emoji_group("Smileys & Emotion") == "smileys and emotion"
    assert df.readable_emoji_subgroup("face-neutral-skeptical") == "face neutral skeptical"
    assert df.readable_emoji_subgroup("arts & crafts") == "arts and crafts"
    assert df.readable_lexname("noun.animal") == "animal"
    assert df.readable_lexname("noun.Tops") == "top concept"


# ----------------------------------------------------------------------------- splits
def test_emoji_split_rule(emoji):
    train = df.emoji_subset_indices(emoji, "train")
    held = df.emoji_subset_indices(emoji, "heldout")
    assert set(train).isdisjoint(held)
    assert sorted(np.concatenate([train, held]).tolist()) == df.emoji_subset_indices(emoji, "all").tolist()
    assert all(emoji["subgroup"][i] % 5 == 4 for i in held)
    assert all(emoji["subgroup"][i] % 5 != 4 for i in train)
    held_sub = {int(emoji["subgroup"][i]) for i in held}
    assert held_sub == set(df.emoji_heldout_subgroups(99)) and len(held_sub) == 19
    assert {str(emoji["subgroup_names"][k]) for k in held_sub} >= {"face-concerned", "heart", "clothing", "arrow"}
    # held-out emoji span most groups, so group classification of them is meaningful
    assert len({int(emoji["group"][i]) for i in held}) >= 8
    assert 250 < len(held) < 400
    # deterministic: recomputing gives the same lists
    assert df.emoji_subset_indices(emoji, "heldout").tolist() == held.tolist()


def test_wordnet_split_rule():
    rows = df.load_wordnet()
    assert len(rows) > 3000 and len(rows.lexnames) == 26
    train, test = df.wordnet_subset_indices(rows, "train"), df.wordnet_subset_indices(rows, "test")
    assert set(train).isdisjoint(test) and len(train) + len(test) == len(rows)
    assert 0.18 < len(test) / len(rows) < 0.22
    # each lexname: its j-th line is test iff j % 5 == 4
    pos: dict[int, int] = {}
    for i, lab in enumerate(rows.labels):
        j = pos.get(lab, 0)
        assert rows.test[i] == (j % 5 == 4)
        pos[lab] = j + 1
    assert set(rows.labels[i] for i in test) == set(range(26))
    assert all(rows.glosses[i] and "\t" not in rows.glosses[i] for i in range(len(rows)))


# ----------------------------------------------------------------------------- samples
def check_image(img, size):
    assert isinstance(img, torch.Tensor) and img.dtype == torch.float32 and img.shape == (3, size, size)
    raw = img * STD + MEAN
    assert raw.min() > -0.2 and raw.max() < 1.2  # normalised with the ImageNet mean/std (bicubic overshoot)


def test_emoji_caption_and_retrieval_samples(emoji):
    train = build_demo_dataset(task("image_caption"), source(source="emoji"), "train", None, ModelConfig(image_size=64))
    assert len(train) == len(df.emoji_subset_indices(emoji, "train"))
    s = train[(0, 7)]
    assert set(s) == {"image", "caption", "id"}
    check_image(s["image"], 64)
    assert s["caption"] == "grinning face" and s["id"] == 0
    # white corners stay white after resizing
    assert torch.allclose(s["image"][:, 0, 0], (1 - MEAN.view(3)) / STD.view(3), atol=1e-3)
    ev = build_demo_dataset(task("image_retrieval", image_size=32), source(source="emoji"), "eval", None, None)
    assert ev.subset == "heldout"
    s = ev[5]
    assert set(s) == {"image", "captions", "id"}
    check_image(s["image"], 32)
    assert s["captions"] == [str(emoji["names"][s["id"]])]
    assert emoji["subgroup"][s["id"]] % 5 == 4
    assert ev.captions()[5] == s["captions"][0]


def test_emoji_classification_labels(emoji):
    ds = build("image_classification", "eval", source="emoji", label="subgroup", subset="all")
    s = ds[10]
    assert set(s) == {"image", "label", "id"} and isinstance(s["label"], int)
    assert s["label"] == int(emoji["subgroup"][s["id"]])
    assert max(ds.labels()) < len(df.demo_class_names("emoji", "subgroup"))
    g = build("image_classification", "eval", source="emoji")  # default label: group, subset: heldout
    assert g.label_kind == "group" and len(g) == len(df.emoji_subset_indices(emoji, "heldout"))
    assert set(g.labels()) <= set(range(9))
    limited = build_demo_dataset(task("image_classification"),
                                 DataSourceConfig(format="demo", limit=7, options={"source": "emoji"}),
                                 "train", None, ModelConfig(image_size=64))
    assert len(limited) == 7


def test_fashion_mnist_samples():
    ds = build("image_classification", "train", source="fashion_mnist")
    assert len(ds) == 1500
    s = ds[(3, 1)]
    assert set(s) == {"image", "label", "id"}
    check_image(s["image"], 64)
    raw = s["image"] * STD + MEAN
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[0], raw[2], atol=1e-5)  # gray -> RGB
    test = build("image_classification", "eval", source="fashion_mnist")
    assert test.subset == "test" and len(test) == 500 and sorted(set(test.labels())) == list(range(10))
    # `split` names the subset when options.subset is absent
    ds = build_demo_dataset(task("image_classification"),
                            DataSourceConfig(format="demo", split="test", options={"source": "fashion_mnist"}),
                            "train", None, ModelConfig(image_size=64))
    assert ds.subset == "test"


def test_wordnet_mlm_samples(tok):
    t = task("text_mlm", mlm_probability=0.15, max_text_len=24)
    ds = build_demo_dataset(t, source(source="wordnet"), "train", tok, None)
    rows = df.load_wordnet()
    picked = total = 0
    state = random.getstate()
    for i in range(0, 400, 4):
        s = ds[(i, 1000 + i)]
        assert set(s) == {"ids", "mlm_labels", "id"}
        ids, labels = s["ids"], s["mlm_labels"]
        assert len(ids) == len(labels) <= 24
        original = tok.encode_texts([rows.text(s["id"])], max_len=24)[0]
        assert len(original) == len(ids) and original[-1] == EOT  # text + " <|endoftext|>", last id kept
        words = list(_word_spans(tok, rows.text(s["id"])))
        assert all(b == -1 or 0 <= b < 49411 for b in labels)
        # unpicked positions keep the original ids; picked positions carry the original as label
        for a, b, o in zip(ids, labels, original, strict=True):
            if b == -1:
                assert a == o
            else:
                assert b == o
        # whole words: every BPE piece of a word is picked together (last kept id may be cut)
        for start, end in words:
            if end <= len(ids) - 1:
                flags = {labels[k] != -1 for k in range(start, end)}
                assert len(flags) == 1
        picked += sum(b != -1 for b in labels)
        total += len(labels)
    assert random.getstate() == state  # the global RNG is restored
    assert 0.08 < picked / total < 0.25
    # same (index, seed) -> same sample; another seed -> (almost surely) another mask
    assert ds[(5, 42)] == ds[(5, 42)]
    assert any(ds[(5, 42)] != ds[(5, 43 + k)] for k in range(5))
    # evaluation indexing with a plain int is deterministic too
    assert ds[5] == ds[5]


def _word_spans(tok, text):
    """(start, end) id spans of the basic words of `text`."""
    from uniperceiver.data.text import split_words

    pos = 0
    for w in split_words(tok, text):
        yield pos, pos + len(w)
        pos += len(w)


def test_wordnet_mlm_masks_with_spe(tok):
    ds = build_demo_dataset(task("text_mlm", mlm_probability=0.5), source(source="wordnet"), "train", tok, None)
    values = []
    for i in range(60):
        s = ds[(i, i)]
        values += [a for a, b in zip(s["ids"], s["mlm_labels"], strict=True) if b != -1]
    assert values and sum(v == SPE for v in values) / len(values) > 0.6


def test_wordnet_classification_samples(tok):
    ds = build_demo_dataset(task("text_classification", max_text_len=20), source(source="wordnet"), "eval", tok, None)
    assert ds.subset == "test"
    suffix = tok.encode("<|endoftext|> It is <|spe|>. <|endoftext|>")
    for i in range(0, len(ds), 37):
        s = ds[i]
        assert set(s) == {"ids", "spe_index", "label", "id"}
        assert len(s["ids"]) <= 20 and s["ids"][s["spe_index"]] == SPE and s["ids"][-1] == EOT
        assert s["ids"][-len(suffix):] == suffix
        assert 0 <= s["label"] < 26
    rows = df.load_wordnet()
    short = ds[0]
    assert short["label"] == rows.labels[short["id"]] and rows.test[short["id"]]


def test_build_errors(tok):
    with pytest.raises(ValueError, match="options.source"):
        build("image_classification", "train", source="mnist")
    with pytest.raises(ValueError, match="feeds"):
        build("text_mlm", "train", tok, source="emoji")
    with pytest.raises(ValueError, match="unknown config key .options.colour."):
        build("image_classification", "train", source="emoji", colour="red")
    with pytest.raises(ValueError, match="subset"):
        build("image_classification", "train", source="fashion_mnist", subset="heldout")
    with pytest.raises(ValueError, match="mode"):
        build("text_mlm", "train", tok, source="wordnet", mode="classification")
    with pytest.raises(DataError, match="prepare"):
        build_demo_dataset(task("image_classification"), DataSourceConfig(
            format="demo", root="/nonexistent/demo", options={"source": "emoji"}), "train", None, None)


# ----------------------------------------------------------------------------- prepare.py helpers
EMOJI_TEST = """\
# emoji-test.txt
# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face

# subgroup: face-affection
1F970                                                  ; fully-qualified     # 🥰 E11.0 smiling face with hearts

# group: Component

# subgroup: skin-tone
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone

# group: People & Body

# subgroup: hand-fingers-open
1F44B                                                  ; fully-qualified     # 👋 E0.6 waving hand
1F44B 1F3FB                                            ; fully-qualified     # 👋🏻 E1.0 waving hand: light skin tone
1F468 200D 1F469 200D 1F467                            ; fully-qualified     # 👨‍👩‍👧 E2.0 family: man, woman, girl
"""

DATA_NOUN = "".join(line + "  \n" for line in [  # data.noun lines end with two spaces
    "  1 This software and database is being provided to you, the LICENSEE, by",
    "  2 Princeton University under the following license.",
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 | that which is perceived",
    '00015388 05 n 02 animal 0 animate_being 0 001 @ 00004475 n 0000 | a living organism; "animals move"',
    "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 02083346 n 0000 | a member of the genus Canis",
    "02121620 05 n 01 cat 0 000 | feline mammal",
    "03082979 06 n 01 computer 0 000 | a machine for performing calculations automatically",
])


def test_parse_emoji_test():
    entries, groups, subgroups = prepare.parse_emoji_test(EMOJI_TEST.splitlines())
    assert [e.name for e in entries] == ["grinning face", "smiling face", "smiling face with hearts", "waving hand",
                                         "waving hand: light skin tone", "family: man, woman, girl"]
    assert groups == ["Smileys & Emotion", "People & Body"]  # Component has no fully-qualified emoji
    assert subgroups == [("Smileys & Emotion", "face-smiling"), ("Smileys & Emotion", "face-affection"),
                         ("People & Body", "hand-fingers-open")]
    assert entries[1].codepoints == (0x263A, 0xFE0F) and entries[1].text == "\u263a\ufe0f"
    assert [e.skin_tone for e in entries] == [False, False, False, False, True, False]
    assert entries[5].codepoint_str == "1F468 200D 1F469 200D 1F467"
    with pytest.raises(ValueError, match="cannot parse"):
        prepare.parse_emoji_test(["# group: G", "# subgroup: s", "not an emoji line"])


def test_parse_wordnet_and_build(tmp_path):
    synsets = prepare.parse_wordnet_data(DATA_NOUN.splitlines())
    assert [s.offset for s in synsets] == ["00001740", "00015388", "02084071", "02121620", "03082979"]
    assert synsets[2].words == ("dog", "domestic_dog", "Canis_familiaris") and synsets[2].lexfile == 5
    assert synsets[1].gloss == 'a living organism; "animals move"'
    assert prepare.LEXNAMES[5] == "noun.animal" and prepare.LEXNAMES[3] == "noun.Tops"
    assert prepare.parse_lexnames(["05\tnoun.animal\t1", "29\tverb.body\t2"]) == {5: "noun.animal", 29: "verb.body"}
    (tmp_path / "data.noun").write_text(DATA_NOUN)
    rows, classes, info = prepare.build_wordnet(tmp_path, per_class=2, rng=np.random.default_rng(0))
    assert rows[0] == "lexname\tsynset\tlemma\tgloss"
    assert classes == ["top concept", "animal", "artifact"]
    assert info["lines"] == 1 + 2 + 1
    assert [r.split("\t")[0] for r in rows[1:]] == ["noun.Tops", "noun.animal", "noun.animal", "noun.artifact"]


def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def test_read_idx_and_fashion_subset(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    y = np.arange(40, dtype=np.uint8) % 10
    assert np.array_equal(prepare.read_idx(_idx(x)), x)
    with pytest.raises(ValueError, match="IDX"):
        prepare.read_idx(b"\x00\x00\x0d\x01" + bytes(8))
    with pytest.raises(ValueError, match="data bytes"):
        prepare.read_idx(_idx(x)[:-1])
    for key, name in prepare.FASHION_FILES.items():
        (tmp_path / name).write_bytes(gzip.compress(_idx(x if "images" in key else y)))
    arrays, info = prepare.build_fashion_mnist(tmp_path, 3, 1, np.random.default_rng(0))
    assert arrays["train_images"].shape == (30, 28, 28) and arrays["test_images"].shape == (10, 28, 28)
    assert np.bincount(arrays["train_labels"]).tolist() == [3] * 10
    assert np.array_equal(arrays["train_images"], x[arrays["train_source_index"]])
    again, _ = prepare.build_fashion_mnist(tmp_path, 3, 1, np.random.default_rng(0))
    assert np.array_equal(again["train_source_index"], arrays["train_source_index"])


def test_save_npz_deterministic_and_loadable(tmp_path):
    arrays = {"images": np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3), "names": np.array(["a b", "ç"])}
    prepare.save_npz(tmp_path / "a.npz", arrays)
    prepare.save_npz(tmp_path / "b.npz", arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        assert np.array_equal(z["images"], arrays["images"]) and z["names"].tolist() == ["a b", "ç"]


def test_prepare_names_the_missing_package(tmp_path):
    with pytest.raises(SystemExit, match="fonts-noto-color-emoji"):
        prepare.main(["--out", str(tmp_path), "--font", str(tmp_path / "missing.ttf")])
    with pytest.raises(SystemExit, match="wordnet-base"):
        prepare.main(["--out", str(tmp_path), "--font", __file__, "--emoji-test", __file__,
                      "--fashion-mnist", str(tmp_path), "--wordnet", str(tmp_path / "nope")])


def test_dataset_reads_another_root(tmp_path, tok):
    """`root` pointing at a folder written the way prepare.py writes it."""
    entries, groups, subgroups = prepare.parse_emoji_test(EMOJI_TEST.splitlines())
    n = len(entries)
    imgs = np.full((n, 32, 32, 3), 255, dtype=np.uint8)
    imgs[:, 8:24, 8:24] = 10
    prepare.save_npz(tmp_path / "emoji.npz", {
        "images": imgs, "names": np.array([e.name for e in entries]),
        "codepoints": np.array([e.codepoint_str for e in entries]),
        "group": np.array([groups.index(e.group) for e in entries], dtype=np.int16),
        "subgroup": np.array([[s for _, s in subgroups].index(e.subgroup) for e in entries], dtype=np.int16),
        "skin_tone": np.array([e.skin_tone for e in entries]),
        "group_names": np.array(groups), "subgroup_names": np.array([s for _, s in subgroups]),
        "subgroup_group": np.array([groups.index(g) for g, _ in subgroups], dtype=np.int16)})
    prepare.write_names(tmp_path / "emoji_groups.txt", [df.readable_emoji_group(g) for g in groups])
    cfg = DataSourceConfig(format="demo", root=str(tmp_path), options={"source": "emoji", "subset": "all"})
    ds = build_demo_dataset(task("image_classification"), cfg, "eval", None, ModelConfig(image_size=32))
    assert len(ds) == n - 1  # the skin-tone variant is left out by default
    assert ds.class_names == ["smileys and emotion", "people and body"]
    assert ds[3]["label"] == 1
    cfg.options["skin_tones"] = True
    assert len(build_demo_dataset(task("image_classification"), cfg, "eval", None, None)) == n


@pytest.mark.skipif(not prepare.Path(prepare.FONT[2]).is_file(), reason="fonts-noto-color-emoji not installed")
def test_renderer_with_installed_font():
    r = prepare.EmojiRenderer(prepare.FONT[2])
    img = r.render("\U0001F600")
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img[0, 0].tolist() == [255, 255, 255]
    assert r.render("\U0010FFFD") is None  # no glyph: skipped
