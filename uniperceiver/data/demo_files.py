"""The embedded offline demo data: where it lives, how to read it, and the fixed split rules.

The files under `uniperceiver/demo/data/` are written by the maintainer script
`python -m uniperceiver.tools.maintainer.prepare_demo_data` from four Debian packages (licenses in `data/LICENSES.md`):

- `emoji.npz`: every renderable fully-qualified emoji of Unicode's `emoji-test.txt` (without the
  skin-tone variants unless prepared with `--skin-tones`), drawn with Noto Color Emoji on white at
  32 x 32. Arrays: `images` uint8 [N, 32, 32, 3], `names` (CLDR names, e.g. "grinning face"),
  `codepoints` ("1F600"), `group` / `subgroup` int16 [N] indexing `group_names` [9] /
  `subgroup_names` (CLDR order), `subgroup_group` [number of subgroups] (each subgroup's group),
  `skin_tone` bool [N].
- `fashion_mnist.npz`: a stratified subset of Fashion-MNIST (`train_images` uint8 [n, 28, 28],
  `train_labels`, `test_images`, `test_labels`, `train_source_index` / `test_source_index` = the
  positions in the official files, `class_names`).
- `wordnet_glosses.tsv`: a stratified subset of WordNet 3.0 noun synsets, one per line after a
  header: `lexname <TAB> synset offset <TAB> first lemma <TAB> gloss`, grouped by lexname (in
  lexicographer-file order) and by offset inside a group.
- Class-name files, one name per line, in label order (for `target_sets.X.file`):
  `emoji_groups.txt`, `emoji_subgroups.txt`, `fashion_mnist_classes.txt`, `wordnet_lexnames.txt`.

Split rules (deterministic, computed from the stored order, never from random draws):

- emoji: subgroup k (its position in `subgroup_names`, CLDR order) is **held out** iff
  `k % 5 == 4` (every 5th subgroup: 19 of the 99); 'train' = the other subgroups. Group names
  are never training targets, so classifying held-out emoji into the 9 groups is zero-shot.
- WordNet: inside each lexname, the j-th line (0-based, file order) is **test** iff `j % 5 == 4`.
- Fashion-MNIST: the official train / test files (the subset keeps that split).

Only numpy is needed here (no torch), so the maintainer script that writes the data
(`uniperceiver/tools/maintainer/prepare_demo_data.py`) shares the naming rules.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..utils.resources import demo_data_dir

__all__ = [
    "CLASS_NAME_FILES",
    "EMOJI_FILE",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILE",
    "HELDOUT_EVERY",
    "HELDOUT_OFFSET",
    "VOCAB_IDS_FILE",
    "WORDNET_FILE",
    "WordNetRows",
    "class_names_path",
    "demo_class_names",
    "demo_data_dir",
    "demo_texts",
    "demo_vocab_ids",
    "emoji_heldout_subgroups",
    "emoji_subset_indices",
    "is_heldout_subgroup",
    "is_test_row",
    "load_emoji",
    "load_fashion_mnist",
    "load_wordnet",
    "readable_emoji_group",
    "readable_emoji_subgroup",
    "readable_lexname",
    "wordnet_subset_indices",
]

EMOJI_FILE = "emoji.npz"
FASHION_MNIST_FILE = "fashion_mnist.npz"
WORDNET_FILE = "wordnet_glosses.tsv"
WORDNET_HEADER = ("lexname", "synset", "lemma", "gloss")

# (source, label) -> class-name file
CLASS_NAME_FILES: dict[tuple[str, str], str] = {
    ("emoji", "group"): "emoji_groups.txt",
    ("emoji", "subgroup"): "emoji_subgroups.txt",
    ("fashion_mnist", "class"): "fashion_mnist_classes.txt",
    ("wordnet", "lexname"): "wordnet_lexnames.txt",
}
_DEFAULT_LABEL = {"emoji": "group", "fashion_mnist": "class", "wordnet": "lexname"}

# Split rule: every HELDOUT_EVERY-th item (position % HELDOUT_EVERY == HELDOUT_OFFSET) is held out.
HELDOUT_EVERY = 5
HELDOUT_OFFSET = 4

# Fashion-MNIST labels 0..9 (the dataset's README: T-shirt/top, Trouser, Pullover, Dress, Coat,
# Sandal, Shirt, Sneaker, Bag, Ankle boot), lower-cased for prompts.
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)

# Readable names where stripping the "noun." prefix is not enough.
_LEXNAME_OVERRIDES = {"noun.Tops": "top concept"}


# --------------------------------------------------------------------------- names
def readable_emoji_group(name: str) -> str:
    """'Smileys & Emotion' -> 'smileys and emotion'."""
    return " ".join(name.replace("&", " and ").split()).lower()


def readable_emoji_subgroup(name: str) -> str:
    """'face-smiling' -> 'face smiling', 'sky & weather' -> 'sky and weather'."""
    return " ".join(name.replace("&", " and ").replace("-", " ").split()).lower()


def readable_lexname(lexname: str) -> str:
    """'noun.animal' -> 'animal' ('noun.Tops' -> 'top concept')."""
    if lexname in _LEXNAME_OVERRIDES:
        return _LEXNAME_OVERRIDES[lexname]
    return lexname.split(".", 1)[-1].replace("_", " ").lower()


# --------------------------------------------------------------------------- split rules
def is_heldout_subgroup(subgroup_index: int) -> bool:
    """The emoji split rule: subgroup k (CLDR order) is held out iff k % 5 == 4."""
    return subgroup_index % HELDOUT_EVERY == HELDOUT_OFFSET


def is_test_row(position_in_class: int) -> bool:
    """The WordNet split rule: the j-th line of a lexname (0-based) is test iff j % 5 == 4."""
    return position_in_class % HELDOUT_EVERY == HELDOUT_OFFSET


def emoji_heldout_subgroups(num_subgroups: int) -> list[int]:
    return [k for k in range(num_subgroups) if is_heldout_subgroup(k)]


# --------------------------------------------------------------------------- files


def _root(root: str | os.PathLike | None) -> Path:
    if root is None or str(root) == "":
        return demo_data_dir()
    return Path(os.path.expanduser(os.path.expandvars(os.fspath(root))))


def _open_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(
            f"demo {what} file {path} not found; "
            f"write it with `python -m uniperceiver.tools.maintainer.prepare_demo_data --out {path.parent}`"
        )
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_emoji(root: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The arrays of `emoji.npz` (see the module docstring)."""
    data = _open_npz(_root(root) / EMOJI_FILE, "emoji")
    n = len(data["images"])
    for key in ("names", "codepoints", "group", "subgroup", "skin_tone"):
        if len(data[key]) != n:
            raise ValueError(f"{EMOJI_FILE}: {key} has {len(data[key])} entries, images {n}")
    return data


def load_fashion_mnist(root: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The arrays of `fashion_mnist.npz` (see the module docstring)."""
    return _open_npz(_root(root) / FASHION_MNIST_FILE, "Fashion-MNIST")


@dataclass
class WordNetRows:
    lexnames: list[str]  # the class list (lexicographer-file order); label = position
    labels: list[int]
    synsets: list[str]
    lemmas: list[str]
    glosses: list[str]
    test: list[bool]  # the split rule applied to each line

    def __len__(self) -> int:
        return len(self.labels)

    def text(self, i: int, with_lemma: bool = True) -> str:
        """'dog: a member of the genus Canis ...' (or the gloss alone)."""
        return f"{self.lemmas[i]}: {self.glosses[i]}" if with_lemma else self.glosses[i]


def load_wordnet(root: str | os.PathLike | None = None) -> WordNetRows:
    """Rows of `wordnet_glosses.tsv`, labels indexing the lexname list in `wordnet_lexnames.txt`
    order (the lexname column's first-appearance order must agree with it)."""
    base = _root(root)
    path = base / WORDNET_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"demo WordNet file {path} not found; write it with "
            f"`python -m uniperceiver.tools.maintainer.prepare_demo_data --out {base}`"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or tuple(lines[0].split("\t")) != WORDNET_HEADER:
        raise ValueError(f"{path}:1: expected the header {'<TAB>'.join(WORDNET_HEADER)}")
    lexnames: list[str] = []
    rows = WordNetRows(lexnames, [], [], [], [], [])
    seen: dict[str, int] = {}
    for no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise ValueError(f"{path}:{no}: expected 4 tab-separated fields, got {len(fields)}: {line[:120]!r}")
        lexname, synset, lemma, gloss = fields
        if lexname not in seen:
            if lexname in lexnames:
                raise ValueError(f"{path}:{no}: lexname {lexname!r} lines are not contiguous")
            lexnames.append(lexname)
            seen[lexname] = 0
        if lexname != lexnames[-1]:
            raise ValueError(f"{path}:{no}: lexname {lexname!r} lines are not contiguous")
        rows.labels.append(len(lexnames) - 1)
        rows.synsets.append(synset)
        rows.lemmas.append(lemma)
        rows.glosses.append(gloss)
        rows.test.append(is_test_row(seen[lexname]))
        seen[lexname] += 1
    listed = class_names_path("wordnet", "lexname", root)
    if listed.is_file():
        expected = [readable_lexname(x) for x in lexnames]
        names = _read_names(listed)
        if names != expected:
            raise ValueError(f"{listed} does not list the lexnames of {path} in order: {names} vs {expected}")
    return rows


# --------------------------------------------------------------------------- subsets
_EMOJI_SUBSETS = ("train", "heldout", "all")
_WORDNET_SUBSETS = ("train", "test", "all")


def emoji_subset_indices(data: dict[str, np.ndarray], subset: str, skin_tones: bool = False) -> np.ndarray:
    """Indices (into the emoji arrays, ascending) of 'train' / 'heldout' / 'all' emoji."""
    if subset not in _EMOJI_SUBSETS:
        raise ValueError(f"emoji subset {subset!r} is not one of {list(_EMOJI_SUBSETS)}")
    keep = np.ones(len(data["images"]), dtype=bool)
    if not skin_tones:
        keep &= ~data["skin_tone"].astype(bool)
    if subset != "all":
        held = np.array([is_heldout_subgroup(int(k)) for k in data["subgroup"]], dtype=bool)
        keep &= held if subset == "heldout" else ~held
    return np.flatnonzero(keep)


def wordnet_subset_indices(rows: WordNetRows, subset: str) -> list[int]:
    if subset not in _WORDNET_SUBSETS:
        raise ValueError(f"WordNet subset {subset!r} is not one of {list(_WORDNET_SUBSETS)}")
    if subset == "all":
        return list(range(len(rows)))
    want_test = subset == "test"
    return [i for i, t in enumerate(rows.test) if t == want_test]


# --------------------------------------------------------------------------- class names
def class_names_path(source: str, label: str | None = None, root: str | os.PathLike | None = None) -> Path:
    """The class-name file of `source` ('emoji' with label 'group' | 'subgroup', 'fashion_mnist',
    'wordnet'), for `target_sets.X.file`."""
    label = label or _DEFAULT_LABEL.get(source, "")
    key = (source, label)
    if key not in CLASS_NAME_FILES:
        raise ValueError(f"no class names for source {source!r} label {label!r}; "
                         f"known: {sorted(CLASS_NAME_FILES)}")
    return _root(root) / CLASS_NAME_FILES[key]


def _read_names(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def demo_class_names(source: str, label: str | None = None, root: str | os.PathLike | None = None) -> list[str]:
    """Readable class names in label order: Fashion-MNIST ('t-shirt', 'trouser', ...), emoji groups
    ('smileys and emotion', ...) or subgroups ('face smiling', ...), WordNet lexnames ('act',
    'animal', ...)."""
    path = class_names_path(source, label, root)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file {path} not found; "
                                "run `python -m uniperceiver.tools.maintainer.prepare_demo_data`")
    return _read_names(path)


VOCAB_IDS_FILE = "demo_vocab_ids.txt"


def demo_texts(folder: str | os.PathLike | None = None) -> list[str]:
    """Every text the demo tasks read or predict: emoji names and WordNet 'lemma: gloss' lines."""
    emoji = load_emoji(folder)
    wordnet = load_wordnet(folder)
    texts = [str(n) for n in emoji["names"]]
    texts += [f"{lemma}: {gloss}" for lemma, gloss in zip(wordnet.lemmas, wordnet.glosses)]
    return texts


def demo_vocab_ids(tokenizer, folder: str | os.PathLike | None = None) -> list[int]:
    """The sorted BPE ids of the demo texts plus <|endoftext|>: the demo's vocabulary target set
    (captions and MLM predict only words that occur in the demo data)."""
    ids = {tokenizer.EOT}
    for text in demo_texts(folder):
        ids.update(tokenizer.encode(text))
    return sorted(ids)
