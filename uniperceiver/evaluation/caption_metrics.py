"""COCO caption metrics through pycocotools + pycocoevalcap, as the release's `COCOEvaler`.

The ground truth and the predictions go through `pycocotools.coco.COCO` / `loadRes` (in memory,
no annotation file needed), the Stanford PTB tokenizer (Java), then BLEU-1..4, METEOR (Java),
ROUGE-L, CIDEr and, when its Stanford CoreNLP jars are installed, SPICE. SPICE's own setup
downloads those jars on first use; we never download at run time: without them SPICE is skipped
and a note says how to install them.

Scores are reported x100 (BLEU-4 36.2, CIDEr 115.3), like the papers.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil

__all__ = ["CAPTION_METRICS", "SCORERS", "caption_metrics", "check_caption_tools", "spice_available"]

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
# Scorer groups that can be chosen (METEOR starts a JVM that loads a paraphrase table: ~10 s).
SCORERS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
_SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def _pycocoevalcap_dir() -> str:
    import pycocoevalcap

    return list(pycocoevalcap.__path__)[0]


def spice_available() -> tuple[bool, str]:
    """(available, why not) -- SPICE needs Java and the CoreNLP 3.6.0 jars in spice/lib."""
    if shutil.which("java") is None:
        return False, "SPICE skipped: no `java` on PATH"
    lib = os.path.join(_pycocoevalcap_dir(), "spice", "lib")
    missing = [j for j in _SPICE_JARS if not os.path.isfile(os.path.join(lib, j))]
    if missing:
        return False, (f"SPICE skipped: {', '.join(missing)} not in {lib} (install them once with "
                       "`python -m pycocoevalcap.spice.get_stanford_models` or copy them there)")
    return True, ""


def check_caption_tools() -> None:
    """Fail early (before decoding a whole test set) when the caption metrics cannot run."""
    import importlib.util

    missing = [m for m in ("pycocoevalcap", "pycocotools") if importlib.util.find_spec(m) is None]
    from ..utils.errors import BadInputError

    if missing:
        raise BadInputError(f"caption metrics need {' and '.join(missing)}: `pip install pycocoevalcap pycocotools`")
    if shutil.which("java") is None:
        raise BadInputError("caption metrics need Java (the PTB tokenizer and METEOR are Java programs): "
                           "install a JRE so that `java` is on PATH")


def caption_metrics(
    references: dict[int, list[str]],
    predictions: dict[int, str],
    *,
    spice: bool | None = None,
    scorers: tuple[str, ...] | list[str] = SCORERS,
) -> tuple[dict[str, float], list[str]]:
    """Score one predicted caption per image against its reference captions.

    `references` and `predictions` are keyed by the same integer image ids. `spice`: None = when
    available, False = never, True = required (error when unavailable). `scorers` picks a subset
    of SCORERS (all by default).
    Returns (metrics x100, notes).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocotools.coco import COCO

    unknown = sorted(set(scorers) - set(SCORERS))
    if unknown:
        raise ValueError(f"unknown caption scorers {unknown}; choose from {list(SCORERS)}")
    check_caption_tools()
    if set(references) != set(predictions):
        extra = sorted(set(predictions) - set(references))[:5]
        missing = sorted(set(references) - set(predictions))[:5]
        raise ValueError(f"predictions and references disagree on image ids (extra {extra}, missing {missing})")
    if not references:
        raise ValueError("no captions to score (empty evaluation set)")
    empty = [i for i, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"images {empty[:5]} have no reference captions")
    notes: list[str] = []
    use_spice, why = spice_available()
    if spice is True and not use_spice:
        raise RuntimeError(why)
    if spice is False or "SPICE" not in scorers:
        use_spice = False
    elif not use_spice:
        notes.append(why)

    ids = sorted(references)
    gt = {
        "images": [{"id": i} for i in ids],
        "annotations": [
            {"image_id": i, "id": n, "caption": c}
            for n, (i, c) in enumerate((i, c) for i in ids for c in references[i])
        ],
        "type": "captions", "info": {}, "licenses": [],
    }
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # pycocotools prints index-building chatter
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        coco_res = coco.loadRes([{"image_id": i, "caption": predictions[i]} for i in ids])
        gts = {i: coco.imgToAnns[i] for i in ids}
        res = {i: coco_res.imgToAnns[i] for i in ids}
        tokenizer = PTBTokenizer()
        gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
        # The release's order: BLEU, METEOR, ROUGE-L, CIDEr, SPICE.
        chosen: list[tuple[object, tuple[str, ...]]] = []
        if "BLEU" in scorers:
            chosen.append((Bleu(4), ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")))
        if "METEOR" in scorers:
            chosen.append((Meteor(), ("METEOR",)))
        if "ROUGE_L" in scorers:
            chosen.append((Rouge(), ("ROUGE_L",)))
        if "CIDEr" in scorers:
            chosen.append((Cider(), ("CIDEr",)))
        if use_spice:
            from pycocoevalcap.spice.spice import Spice

            chosen.append((Spice(), ("SPICE",)))
        metrics: dict[str, float] = {}
        for scorer, names in chosen:
            score, _ = scorer.compute_score(gts, res)  # type: ignore[attr-defined]
            values = score if isinstance(score, (list, tuple)) else [score]
            for name, value in zip(names, values):
                metrics[name] = 100.0 * float(value)
    return metrics, notes
