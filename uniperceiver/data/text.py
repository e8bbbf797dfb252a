"""Text preparation that needs words, not just ids: MLM whole-word masking and GLUE prompts.

Captions stay strings in the samples and are tokenized in the collate; MLM and GLUE samples are
tokenized in the dataset because masking picks whole words and prompts place `<|spe|>`.
"""
from __future__ import annotations

import random

from ..tokenization import ClipTokenizer

__all__ = ["EOT_ID", "SPE_ID", "build_prompt", "mask_words", "split_words", "truncate_keep_last"]

EOT_ID = ClipTokenizer.EOT
SPE_ID = ClipTokenizer.SPE
_SPECIAL_MIN = ClipTokenizer.SOT  # ids >= 49406 are the specials
_WORD_END = "</w>"


def split_words(tokenizer: ClipTokenizer, text: str) -> list[list[int]]:
    """BPE ids of `text` grouped into basic words (the release's `basic_tokenize` +
    `encode_basic_tokenized_token`): a word ends at its `</w>` piece; a special is a word."""
    tokens = tokenizer.tokenize(text)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    words: list[list[int]] = []
    cur: list[int] = []
    for tok, i in zip(tokens, ids):
        cur.append(i)
        if tok.endswith(_WORD_END) or i >= _SPECIAL_MIN:
            words.append(cur)
            cur = []
    if cur:
        words.append(cur)
    return words


def mask_words(words: list[list[int]], probability: float, vocab_size: int = 49411,
               mask_id: int = SPE_ID) -> tuple[list[int], list[int]]:
    """Whole-word masking (OFFICIAL.md 4.2): each word is picked with `probability`; a picked
    word's ids all become `mask_id` (80 %), random ids (10 %) or stay (10 %). Labels are the
    original ids at the picked positions and -1 elsewhere. Draws from python's `random`."""
    ids: list[int] = []
    labels: list[int] = []
    for word in words:
        p = random.random()
        if p < probability:
            p /= probability
            if p < 0.8:
                ids.extend([mask_id] * len(word))
            elif p < 0.9:
                ids.extend(random.randrange(vocab_size) for _ in word)
            else:
                ids.extend(word)
            labels.extend(word)
        else:
            ids.extend(word)
            labels.extend([-1] * len(word))
    return ids, labels


def truncate_keep_last(ids: list[int], max_len: int) -> list[int]:
    """`ids[:max_len - 1] + [ids[-1]]` when too long (keeps a trailing EOT), as the release."""
    if len(ids) <= max_len:
        return ids
    return ids[: max_len - 1] + [ids[-1]]


def build_prompt(tokenizer: ClipTokenizer, template: str, sentences: list[str], max_len: int,
                 strip_period: bool = False) -> tuple[list[int], int]:
    """Ids of a prompt such as `"{s1} <|endoftext|> It is <|spe|>. <|endoftext|>"` and the index
    of its `<|spe|>` (0-based, inside the text segment).

    Sentences and the literal parts are encoded separately (as the release does for sentence
    pairs); with `strip_period` a final "." of the first sentence is dropped (the release's RTE,
    MRPC, QQP, QNLI prompts). When too long, the longest sentence loses ids from its end until
    the prompt fits, so the template (and `<|spe|>`) always survives.
    """
    parts: list[tuple[str, int | None]] = []  # (literal text, None) or ("", sentence index)
    rest = template
    while rest:
        cut = [(rest.find(f"{{s{k + 1}}}"), k) for k in range(len(sentences))]
        cut = [(pos, k) for pos, k in cut if pos >= 0]
        if not cut:
            parts.append((rest, None))
            break
        pos, k = min(cut)
        if pos:
            parts.append((rest[:pos], None))
        parts.append(("", k))
        rest = rest[pos + len(f"{{s{k + 1}}}"):]
    encoded_sents = [tokenizer.encode(s) for s in sentences]
    if strip_period and encoded_sents and encoded_sents[0][-1:] == tokenizer.encode("."):
        encoded_sents[0] = encoded_sents[0][:-1]
    literal = [tokenizer.encode(text) if k is None else None for text, k in parts]
    fixed = sum(len(ids) for ids in literal if ids is not None)
    used = [k for _, k in parts if k is not None]
    if fixed > max_len:
        raise ValueError(f"prompt template {template!r} alone is {fixed} ids, more than max_text_len={max_len}")
    total = fixed + sum(len(encoded_sents[k]) for k in used)
    while total > max_len:
        longest = max(set(used), key=lambda k: len(encoded_sents[k]))
        encoded_sents[longest] = encoded_sents[longest][:-1]
        total -= used.count(longest)
    ids: list[int] = []
    for (_, k), lit in zip(parts, literal):
        ids.extend(lit if k is None else encoded_sents[k])
    if SPE_ID not in ids:
        raise ValueError(f"prompt template {template!r} has no <|spe|>")
    return ids, ids.index(SPE_ID)
