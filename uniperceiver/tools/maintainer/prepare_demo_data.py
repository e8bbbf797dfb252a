"""Build the embedded demo data from Debian packages.

    apt-get install fonts-noto-color-emoji unicode-data dataset-fashion-mnist wordnet-base
    python -m uniperceiver.tools.maintainer.prepare_demo_data --out uniperceiver/demo/data

Reads
- `/usr/share/unicode/emoji/emoji-test.txt` (unicode-data): fully-qualified emoji with their CLDR
  names, groups and subgroups;
- `/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf` (fonts-noto-color-emoji): a bitmap colour
  font, loaded at size 109 (its only strike) and drawn with `embedded_color=True`;
- `/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`
  (dataset-fashion-mnist);
- `/usr/share/wordnet/data.noun` (wordnet-base): noun synsets, their lexicographer file number
  (-> lexname, e.g. 05 -> noun.animal) and gloss.

Writes into `--out` the files described in `uniperceiver.data.demo_files`, plus `LICENSES.md`
(each package's Debian copyright file, verbatim) and `manifest.json` (package versions, counts,
sizes, sha256). Deterministic: the subsets come from `numpy.random.default_rng(--seed)` and the
zip members carry a fixed timestamp, so the same packages + Pillow/FreeType give identical bytes.

Emoji: each glyph cell (136 x 128 px) is composited on white, padded to a square and reduced to
32 x 32 with a box filter. An emoji is skipped (and counted) when the font has no single glyph
for it: nothing drawn, the `.notdef` box, or several glyphs side by side (a ZWJ sequence or
flag drawn piecewise, which happens when Pillow lacks libraqm). Skin-tone variants (sequences
with U+1F3FB..U+1F3FF, about half of all emoji) are recolourings whose names only add
": medium skin tone"; they are left out unless `--skin-tones` (the packaged data leaves them out
to stay under 3 MB).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...data.demo_files import (
    CLASS_NAME_FILES,
    EMOJI_FILE,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILE,
    WORDNET_FILE,
    WORDNET_HEADER,
    emoji_heldout_subgroups,
    is_test_row,
    readable_emoji_group,
    readable_emoji_subgroup,
    readable_lexname,
)

# (what, Debian package, default path)
FONT = ("Noto Color Emoji font", "fonts-noto-color-emoji", "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = ("emoji-test.txt", "unicode-data", "/usr/share/unicode/emoji/emoji-test.txt")
FASHION_DIR = ("Fashion-MNIST folder", "dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist")
WORDNET_DIR = ("WordNet database folder", "wordnet-base", "/usr/share/wordnet")
PACKAGES = ("fonts-noto-color-emoji", "unicode-data", "dataset-fashion-mnist", "wordnet-base")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

IMAGE_SIZE = 32
FONT_SIZE = 109  # Noto Color Emoji's only bitmap strike (CBDT); other sizes fail to load
SKIN_TONES = range(0x1F3FB, 0x1F3FF + 1)

# WordNet 3.0 lexicographer files (the `lexnames` file; wordnet-base does not ship it).
LEXNAMES: dict[int, str] = dict(enumerate([
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
]))


class MissingSource(SystemExit):
    pass


def require(path: str | os.PathLike, what: str, package: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise MissingSource(
            f"prepare: {what} not found at {p}: install the Debian package '{package}' "
            f"(apt-get install {package}) or pass its path explicitly (see --help)"
        )
    return p


# =========================================================================== emoji-test.txt
@dataclass(frozen=True)
class EmojiEntry:
    codepoints: tuple[int, ...]
    name: str
    group: str
    subgroup: str

    @property
    def text(self) -> str:
        return "".join(chr(c) for c in self.codepoints)

    @property
    def skin_tone(self) -> bool:
        return any(c in SKIN_TONES for c in self.codepoints)

    @property
    def codepoint_str(self) -> str:
        return " ".join(f"{c:04X}" for c in self.codepoints)


_EMOJI_LINE = re.compile(
    r"^(?P<cps>[0-9A-Fa-f]+(?:\s+[0-9A-Fa-f]+)*)\s*;\s*(?P<status>[a-z-]+)\s*#\s*\S+\s+"
    r"(?:E\d+\.\d+\s+)?(?P<name>.+?)\s*$"
)


def parse_emoji_test(lines: Iterable[str]) -> tuple[list[EmojiEntry], list[str], list[tuple[str, str]]]:
    """Fully-qualified emoji of `emoji-test.txt`, the group names, and the (group, subgroup) pairs
    that have at least one fully-qualified emoji, all in file (CLDR) order."""
    group = subgroup = None
    entries: list[EmojiEntry] = []
    subgroups: OrderedDict[tuple[str, str], None] = OrderedDict()
    for no, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            body = line[1:].strip()
            if body.startswith("group:"):
                group, subgroup = body[len("group:"):].strip(), None
            elif body.startswith("subgroup:"):
                subgroup = body[len("subgroup:"):].strip()
            continue
        m = _EMOJI_LINE.match(line)
        if m is None:
            raise ValueError(f"emoji-test.txt:{no}: cannot parse {line!r}")
        if m["status"] != "fully-qualified":
            continue
        if group is None or subgroup is None:
            raise ValueError(f"emoji-test.txt:{no}: emoji before any '# group:' / '# subgroup:' line")
        entries.append(EmojiEntry(tuple(int(c, 16) for c in m["cps"].split()), m["name"], group, subgroup))
        subgroups[(group, subgroup)] = None
    groups = list(OrderedDict((g, None) for g, _ in subgroups))
    names = [s for _, s in subgroups]
    if len(set(names)) != len(names):
        raise ValueError("emoji-test.txt: a subgroup name appears under two groups")
    return entries, groups, list(subgroups)


# =========================================================================== rendering
class EmojiRenderer:
    """Draws one emoji per glyph cell with Pillow; `render` returns uint8 [S, S, 3] or None."""

    def __init__(self, font_path: str | os.PathLike, size: int = IMAGE_SIZE) -> None:
        from PIL import ImageFont, features

        self.size = size
        self.raqm = bool(features.check("raqm"))
        engine = ImageFont.Layout.RAQM if self.raqm else ImageFont.Layout.BASIC
        self.font = ImageFont.truetype(os.fspath(font_path), size=FONT_SIZE, layout_engine=engine)
        ref = self._draw("\U0001F600")  # grinning face: one glyph
        if ref is None:
            raise RuntimeError(f"{font_path}: cannot draw U+1F600 with embedded colour")
        self.cell_width = ref.size[0]
        notdef = self._draw("\U0010FFFD")  # a private-use code point: the font's .notdef
        self.notdef = None if notdef is None else np.asarray(notdef)

    def _draw(self, text: str):
        from PIL import Image, ImageDraw

        left, top, right, bottom = self.font.getbbox(text)
        if right <= left or bottom <= top:
            return None
        img = Image.new("RGBA", (right - left, bottom - top), (255, 255, 255, 0))
        ImageDraw.Draw(img).text((-left, -top), text, font=self.font, embedded_color=True)
        if img.getchannel("A").getbbox() is None:
            return None
        return img

    def render(self, text: str) -> np.ndarray | None:
        from PIL import Image

        img = self._draw(text)
        if img is None or img.size[0] > 1.5 * self.cell_width:  # nothing / several glyphs
            return None
        if self.notdef is not None and img.size == self.notdef.shape[1::-1] and np.array_equal(
                np.asarray(img), self.notdef):
            return None
        w, h = img.size
        side = max(w, h)
        canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        canvas.alpha_composite(img, ((side - w) // 2, (side - h) // 2))
        small = canvas.convert("RGB").resize((self.size, self.size), Image.Resampling.BOX)
        return np.asarray(small, dtype=np.uint8)


def build_emoji(emoji_test: Path, font: Path, skin_tones: bool, log=print) -> tuple[dict[str, np.ndarray], dict]:
    text = emoji_test.read_text(encoding="utf-8")
    entries, groups, subgroups = parse_emoji_test(text.splitlines())
    version = re.search(r"^#\s*Version:\s*(\S+)", text, re.MULTILINE)
    renderer = EmojiRenderer(font)
    if not renderer.raqm:
        log("prepare: Pillow has no libraqm: ZWJ sequences and flags draw piecewise and are skipped")
    group_index = {g: i for i, g in enumerate(groups)}
    subgroup_index = {sg: i for i, (_, sg) in enumerate(subgroups)}
    images, kept, skipped = [], [], []
    n_tone = 0
    for e in entries:
        if e.skin_tone and not skin_tones:
            n_tone += 1
            continue
        arr = renderer.render(e.text)
        if arr is None:
            skipped.append(f"{e.codepoint_str} {e.name}")
            continue
        images.append(arr)
        kept.append(e)
    arrays = {
        "images": np.stack(images).astype(np.uint8),
        "names": np.array([e.name for e in kept]),
        "codepoints": np.array([e.codepoint_str for e in kept]),
        "group": np.array([group_index[e.group] for e in kept], dtype=np.int16),
        "subgroup": np.array([subgroup_index[e.subgroup] for e in kept], dtype=np.int16),
        "skin_tone": np.array([e.skin_tone for e in kept], dtype=bool),
        "group_names": np.array(groups),
        "subgroup_names": np.array([sg for _, sg in subgroups]),
        "subgroup_group": np.array([group_index[g] for g, _ in subgroups], dtype=np.int16),
    }
    held = set(emoji_heldout_subgroups(len(subgroups)))
    n_held = int(sum(int(k) in held for k in arrays["subgroup"]))
    info = {
        "emoji_version": version[1] if version else None,
        "fully_qualified": len(entries),
        "skin_tone_variants_left_out": n_tone,
        "not_rendered": len(skipped),
        "not_rendered_examples": skipped[:20],
        "kept": len(kept),
        "groups": len(groups),
        "subgroups": len(subgroups),
        "heldout_subgroups": [subgroups[k][1] for k in sorted(held)],
        "train_emoji": len(kept) - n_held,
        "heldout_emoji": n_held,
        "raqm": renderer.raqm,
    }
    return arrays, info


# =========================================================================== Fashion-MNIST
def read_idx(raw: bytes, what: str = "IDX data") -> np.ndarray:
    """Parse an (uncompressed) IDX file: magic 0x0000 + dtype 0x08 (uint8) + ndim, big-endian dims."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{what}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(dims)) if dims else 1
    if len(raw) != header + count:
        raise ValueError(f"{what}: {len(raw) - header} data bytes for dims {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def stratified_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `per_class` random indices of every class (classes in ascending order), sorted."""
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out.append(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def build_fashion_mnist(folder: Path, train_per_class: int, test_per_class: int,
                        rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict]:
    data = {}
    for key, name in FASHION_FILES.items():
        path = require(folder / name, f"Fashion-MNIST file {name}", FASHION_DIR[1])
        data[key] = read_idx(gzip.decompress(path.read_bytes()), str(path))
    arrays: dict[str, np.ndarray] = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        if images.shape[1:] != (28, 28) or len(images) != len(labels) or labels.max() > 9:
            raise ValueError(f"Fashion-MNIST {split}: unexpected shapes {images.shape} / {labels.shape}")
        idx = stratified_indices(labels, per_class, rng)
        arrays[f"{split}_images"] = images[idx]
        arrays[f"{split}_labels"] = labels[idx].astype(np.uint8)
        arrays[f"{split}_source_index"] = idx.astype(np.int32)
    arrays["class_names"] = np.array(FASHION_MNIST_CLASSES)
    info = {"source_train": int(len(data["train_labels"])), "source_test": int(len(data["test_labels"])),
            "train": int(len(arrays["train_labels"])), "test": int(len(arrays["test_labels"]))}
    return arrays, info


# =========================================================================== WordNet
@dataclass(frozen=True)
class Synset:
    offset: str
    lexfile: int
    words: tuple[str, ...]
    gloss: str

    @property
    def lemma(self) -> str:
        return self.words[0].replace("_", " ")


def parse_lexnames(lines: Iterable[str]) -> dict[int, str]:
    """The `lexnames` file: `NN<TAB>pos.name<TAB>syntactic category` per line."""
    out = {}
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit():
            out[int(fields[0])] = fields[1]
    return out


def parse_wordnet_data(lines: Iterable[str]) -> list[Synset]:
    """Synsets of a `data.pos` file (lines starting with two spaces are the license header).

    `offset lex_filenum ss_type w_cnt(hex) word lex_id ... p_cnt ... | gloss`.
    """
    out = []
    for no, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("  "):
            continue
        head, sep, gloss = line.partition(" | ")
        fields = head.split()
        try:
            if not sep or len(fields) < 6:
                raise ValueError
            w_cnt = int(fields[3], 16)
            words = tuple(fields[4 + 2 * i] for i in range(w_cnt))
            lexfile = int(fields[1])
        except (ValueError, IndexError):
            raise ValueError(f"data file line {no}: cannot parse {line[:120]!r}") from None
        gloss = " ".join(gloss.split())
        out.append(Synset(fields[0], lexfile, words, gloss))
    return out


def build_wordnet(folder: Path, per_class: int, rng: np.random.Generator) -> tuple[list[str], list[str], dict]:
    data = require(folder / "data.noun", "WordNet data.noun", WORDNET_DIR[1])
    lexnames = dict(LEXNAMES)
    if (folder / "lexnames").is_file():
        lexnames.update(parse_lexnames((folder / "lexnames").read_text(encoding="utf-8").splitlines()))
    synsets = parse_wordnet_data(data.read_text(encoding="utf-8").splitlines())
    by_file: dict[int, list[Synset]] = {}
    for s in synsets:
        if "\t" in s.gloss or "\t" in s.lemma:
            raise ValueError(f"synset {s.offset}: tab in lemma or gloss")
        by_file.setdefault(s.lexfile, []).append(s)
    rows, classes = ["\t".join(WORDNET_HEADER)], []
    counts = {}
    for lexfile in sorted(by_file):
        name = lexnames.get(lexfile)
        if name is None or not name.startswith("noun."):
            raise ValueError(f"data.noun: lexicographer file {lexfile} is not a noun file ({name})")
        group = by_file[lexfile]
        pick = np.sort(rng.choice(len(group), size=min(per_class, len(group)), replace=False))
        classes.append(readable_lexname(name))
        chosen = [group[i] for i in pick]  # offset order (data.noun is sorted by offset)
        counts[name] = {"synsets": len(group), "kept": len(chosen),
                        "test": sum(is_test_row(j) for j in range(len(chosen)))}
        rows += [f"{name}\t{s.offset}\t{s.lemma}\t{s.gloss}" for s in chosen]
    info = {"noun_synsets": len(synsets), "lexnames": len(classes), "lines": len(rows) - 1,
            "test_lines": sum(c["test"] for c in counts.values()), "per_lexname": counts}
    return rows, classes, info


# =========================================================================== output
def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez_compressed`, but with a fixed member timestamp (byte-identical reruns) and zlib
    level 9. Readable with `np.load(path, allow_pickle=False)`."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key, value in arrays.items():
            arr = np.asarray(value)
            if arr.dtype == object:
                raise TypeError(f"{path.name}:{key}: object arrays need pickle; use fixed-width strings")
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def write_names(path: Path, names: Sequence[str]) -> None:
    for n in names:
        if not n.strip() or "\n" in n or "|" in n:
            raise ValueError(f"{path.name}: class name {n!r} is empty or has a newline / '|'")
    path.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")


def package_version(package: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                             check=False, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


_LICENSE_HEADER = """# Licenses of the embedded demo data

The files in this folder are derived from the Debian packages below by
`python -m uniperceiver.tools.maintainer.prepare_demo_data`. They are **modified** versions of the
original data:

- `emoji.npz` (images): Noto Color Emoji, Copyright 2013-2017 Google Inc. (Debian
  `fonts-noto-color-emoji`), glyphs drawn at 32 x 32 on white. License: SIL Open Font License 1.1
  (the font); the noto-emoji artwork is also released under the Apache License 2.0.
- `emoji.npz` (names, code points, groups, subgroups), `emoji_groups.txt`, `emoji_subgroups.txt`:
  Unicode `emoji-test.txt` (Debian `unicode-data`): CLDR short names, groups and subgroups;
  the group / subgroup names are made lower-case and readable ('&' -> 'and', '-' -> ' ').
  License: Unicode License (terms of use: https://www.unicode.org/copyright.html).
- `fashion_mnist.npz`, `fashion_mnist_classes.txt`: Fashion-MNIST, Copyright 2017 Zalando SE
  (Debian `dataset-fashion-mnist`): a stratified random subset. License: MIT (Expat).
- `wordnet_glosses.tsv`, `wordnet_lexnames.txt`: WordNet 3.0, Princeton University (Debian
  `wordnet-base`): a stratified random subset of noun synsets (lexicographer file, offset, first
  lemma, gloss); lexnames made readable ('noun.animal' -> 'animal'). License: WordNet 3.0 license.

WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
Fashion-MNIST Copyright (c) 2017 Zalando SE.
Noto Color Emoji Copyright 2013-2017 Google Inc.
Unicode data Copyright (c) 1991-2022 Unicode, Inc.

The complete copyright and license statements of each package follow, verbatim from
`/usr/share/doc/<package>/copyright`.
"""


def write_licenses(path: Path, log=print) -> None:
    parts = [_LICENSE_HEADER]
    for pkg in PACKAGES:
        src = Path("/usr/share/doc") / pkg / "copyright"
        parts.append(f"\n---\n\n## {pkg}\n\n")
        if src.is_file():
            parts.append("```\n" + src.read_text(encoding="utf-8", errors="replace").rstrip() + "\n```\n")
        else:
            log(f"prepare: {src} not found; LICENSES.md names the license only")
            parts.append("(copyright file not found on the machine that prepared the data)\n")
    path.write_text("".join(parts), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uniperceiver.tools.maintainer.prepare_demo_data",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (the packaged one: uniperceiver/demo/data)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--font", default=FONT[2])
    ap.add_argument("--emoji-test", default=EMOJI_TEST[2])
    ap.add_argument("--fashion-mnist", default=FASHION_DIR[2], help="folder with the four IDX .gz files")
    ap.add_argument("--wordnet", default=WORDNET_DIR[2], help="folder with data.noun")
    ap.add_argument("--skin-tones", action="store_true", help="keep the skin-tone variants (~2x the emoji)")
    ap.add_argument("--fashion-train-per-class", type=int, default=150)
    ap.add_argument("--fashion-test-per-class", type=int, default=50)
    ap.add_argument("--wordnet-per-class", type=int, default=150)
    args = ap.parse_args(argv)

    font = require(args.font, FONT[0], FONT[1])
    emoji_test = require(args.emoji_test, EMOJI_TEST[0], EMOJI_TEST[1])
    fashion = require(args.fashion_mnist, FASHION_DIR[0], FASHION_DIR[1])
    wordnet = require(args.wordnet, WORDNET_DIR[0], WORDNET_DIR[1])
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise MissingSource("prepare: Pillow is needed to draw the emoji (pip install pillow)") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    manifest: dict = {"seed": args.seed, "image_size": IMAGE_SIZE}

    emoji, info = build_emoji(emoji_test, font, args.skin_tones)
    save_npz(out / EMOJI_FILE, emoji)
    write_names(out / CLASS_NAME_FILES[("emoji", "group")], [readable_emoji_group(g) for g in emoji["group_names"]])
    write_names(out / CLASS_NAME_FILES[("emoji", "subgroup")],
                [readable_emoji_subgroup(s) for s in emoji["subgroup_names"]])
    manifest["emoji"] = info
    print(f"emoji: {info['kept']} kept of {info['fully_qualified']} fully-qualified "
          f"({info['skin_tone_variants_left_out']} skin-tone variants left out, {info['not_rendered']} not rendered); "
          f"train {info['train_emoji']}, heldout {info['heldout_emoji']}  [{time.time() - t0:.1f}s]")

    # One generator, used in a fixed order: Fashion-MNIST train, test, then WordNet.
    rng = np.random.default_rng(args.seed)
    fm, info = build_fashion_mnist(fashion, args.fashion_train_per_class, args.fashion_test_per_class, rng)
    save_npz(out / FASHION_MNIST_FILE, fm)
    write_names(out / CLASS_NAME_FILES[("fashion_mnist", "class")], list(FASHION_MNIST_CLASSES))
    manifest["fashion_mnist"] = info
    print(f"fashion_mnist: {info['train']} train + {info['test']} test  [{time.time() - t0:.1f}s]")

    rows, classes, info = build_wordnet(wordnet, args.wordnet_per_class, rng)
    (out / WORDNET_FILE).write_text("\n".join(rows) + "\n", encoding="utf-8")
    write_names(out / CLASS_NAME_FILES[("wordnet", "lexname")], classes)
    manifest["wordnet"] = info
    print(f"wordnet: {info['lines']} glosses in {info['lexnames']} lexnames ({info['test_lines']} test)  "
          f"[{time.time() - t0:.1f}s]")

    from ...tokenization import ClipTokenizer
    from ...data.demo_files import VOCAB_IDS_FILE, demo_vocab_ids

    vocab = demo_vocab_ids(ClipTokenizer(), out)
    (out / VOCAB_IDS_FILE).write_text("\n".join(map(str, vocab)) + "\n", encoding="utf-8")
    manifest["vocabulary_ids"] = len(vocab)
    print(f"vocabulary: {len(vocab)} token ids occur in the demo texts  [{time.time() - t0:.1f}s]")

    write_licenses(out / "LICENSES.md")
    from PIL import __version__ as pil_version

    manifest["packages"] = {p: package_version(p) for p in PACKAGES}
    manifest["pillow"] = pil_version
    files = {}
    total = 0
    for p in sorted(out.iterdir()):
        if p.is_file() and p.name != "manifest.json":
            data = p.read_bytes()
            files[p.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            total += len(data)
    manifest["files"] = files
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, f in files.items():
        print(f"  {name:28s} {f['bytes'] / 1e3:9.1f} kB")
    print(f"total {total / 1e6:.2f} MB in {out}  [{time.time() - t0:.1f}s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
