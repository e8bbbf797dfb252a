"""CLIP byte-level BPE tokenizer with the Uni-Perceiver special tokens.

Reproduces the id assignment and text normalisation of the original
Uni-Perceiver ``ClipTokenizer`` so that checkpoints, class-name embeddings and
cached token ids stay interchangeable:

* ids ``0..255``: the 256 byte symbols, ``256..511``: the same with ``</w>``,
  ``512..49405``: the first 48,894 merges of ``bpe_simple_vocab_16e6.txt.gz``,
  ``49406..49410``: ``<|startoftext|>``, ``<|endoftext|>``, ``<|mask|>``,
  ``<|gen|>``, ``<|spe|>``.
* ``<|mask|>`` has an id but is *not* in the pre-tokenisation regex of the
  original, so the string ``"<|mask|>"`` in text is split into the ordinary
  words ``<|``, ``mask``, ``|>`` (ids 27, 347, 8306, 91, 285); only ``convert_tokens_to_ids`` and the
  constant :attr:`ClipTokenizer.MASK` reach id 49408.
"""

from __future__ import annotations

import gzip
import html
import importlib.resources
import os
import zlib
from collections.abc import Iterable, Sequence

import ftfy
import regex
import torch

__all__ = ["ClipTokenizer"]

_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"

# Number of merges the original keeps: lines [1, 49152 - 256 - 2 + 1) of the
# file (line 0 is the "#version" header). 48,894 merges + 512 byte symbols
# + CLIP's 2 specials is CLIP's 49,408-entry vocab; Uni-Perceiver adds 3.
_NUM_MERGES = 49152 - 256 - 2
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|mask|>", "<|gen|>", "<|spe|>")
_WORD_END = "</w>"

# Pre-tokenisation pattern of the original. ``<|mask|>`` is deliberately
# absent (see module docstring). IGNORECASE is redundant after lower-casing
# but kept so the pattern is literally the original's.
_TOKEN_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|<\|gen\|>|<\|spe\|>"
    r"|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
# The `regex` module's \s is used (not `re`'s) so whitespace collapsing
# matches the original exactly on unusual Unicode spaces.
_WHITESPACE = regex.compile(r"\s+")


def _byte_symbols() -> list[tuple[int, str]]:
    """(byte, printable stand-in) pairs, in the original's vocab order.

    Bytes that are already printable (and not whitespace/control) stand for
    themselves; the rest are shifted to code points 256+ so that BPE never
    sees whitespace or control characters. The order (printable bytes first,
    then the shifted ones by byte value) defines ids 0..255 and must not
    change.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    pairs = [(b, chr(b)) for b in printable]
    kept = set(printable)
    shifted = [b for b in range(256) if b not in kept]
    pairs += [(b, chr(256 + k)) for k, b in enumerate(shifted)]
    return pairs


def _clean(text: str) -> str:
    """ftfy + double HTML unescape, collapse whitespace, strip, lower-case."""
    text = ftfy.fix_text(text)
    # Twice, as CLIP does, to undo double-escaped entities like "&amp;amp;".
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def pad_ids(seqs: Sequence[Sequence[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists: (ids [B, L] long, padding_mask [B, L] bool, True at padding). The one
    padding helper of the tokenizer, the collate and the target sets."""
    length = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.ones((len(seqs), length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, : len(s)] = False
    return ids, mask


class ClipTokenizer:
    """CLIP BPE tokenizer with Uni-Perceiver's 49,411-entry vocabulary."""

    SOT: int = 49406
    EOT: int = 49407
    MASK: int = 49408
    GEN: int = 49409
    SPE: int = 49410
    vocab_size: int = 49411

    def __init__(self, bpe_path: str | os.PathLike | None = None) -> None:
        """Load the merge list from ``bpe_path`` (default: the packaged file)."""
        raw, shown_path = self._read_bpe_file(bpe_path)
        merges = self._parse_merges(raw, shown_path)

        byte_pairs = _byte_symbols()
        self._byte_to_sym: dict[int, str] = dict(byte_pairs)
        self._sym_to_byte: dict[str, int] = {s: b for b, s in byte_pairs}

        base = [s for _, s in byte_pairs]
        vocab = base + [s + _WORD_END for s in base]
        vocab += ["".join(m) for m in merges]
        vocab += list(_SPECIAL_TOKENS)
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        if len(vocab) != self.vocab_size or len(self.encoder) != self.vocab_size:
            raise ValueError(
                f"CLIP BPE file {shown_path} produced {len(self.encoder)} distinct "
                f"tokens, expected {self.vocab_size}; the file is not the CLIP "
                f"bpe_simple_vocab_16e6 merge list"
            )
        self.decoder: list[str] = vocab
        self._ranks: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges)}
        # Per-instance memo of word -> BPE pieces. Seeded with the specials so
        # they are never split (and get no "</w>"), as in the original.
        self._cache: dict[str, tuple[str, ...]] = {s: (s,) for s in _SPECIAL_TOKENS}
        self.bpe_path = shown_path

    # ------------------------------------------------------------------ io
    @staticmethod
    def _read_bpe_file(bpe_path: str | os.PathLike | None) -> tuple[bytes, str]:
        """Return the gzip bytes of the merge file and a path for messages."""
        if bpe_path is None:
            resource = importlib.resources.files(__package__ or "uniperceiver.tokenization")
            resource = resource.joinpath(_BPE_FILENAME)
            shown = str(resource)
            try:
                return resource.read_bytes(), shown
            except (FileNotFoundError, NotADirectoryError) as exc:
                raise FileNotFoundError(
                    f"packaged CLIP BPE merges file not found: {shown}"
                ) from exc
        path = os.fspath(bpe_path)
        try:
            with open(path, "rb") as fh:
                return fh.read(), path
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise FileNotFoundError(f"CLIP BPE merges file not found: {path}") from exc

    @staticmethod
    def _parse_merges(raw: bytes, shown_path: str) -> list[tuple[str, str]]:
        """Decompress and parse the first ``_NUM_MERGES`` merges."""
        try:
            lines = gzip.decompress(raw).decode("utf-8").split("\n")
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
            raise ValueError(
                f"CLIP BPE merges file {shown_path} is corrupt or not gzip-compressed "
                f"UTF-8: {exc}"
            ) from exc
        selected = lines[1 : _NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in selected]
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(
                f"CLIP BPE merges file {shown_path} is truncated or malformed: "
                f"expected {_NUM_MERGES} 'a b' merge lines after the header"
            )
        return merges  # type: ignore[return-value]

    # ------------------------------------------------------------ core BPE
    def __len__(self) -> int:
        return self.vocab_size

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Split one byte-symbol word into BPE pieces (last piece ends in </w>)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        pieces = list(word[:-1]) + [word[-1] + _WORD_END]
        ranks = self._ranks
        while len(pieces) > 1:
            # Lowest-ranked adjacent pair wins; ranks are unique so ties
            # cannot happen and the result equals the reference algorithm.
            best_rank = None
            best_pair = None
            for pair in zip(pieces, pieces[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_pair = rank, pair
            if best_pair is None:
                break
            left, right = best_pair
            merged: list[str] = []
            i = 0
            n = len(pieces)
            # Merge every non-overlapping occurrence, scanning left to right.
            while i < n:
                if i + 1 < n and pieces[i] == left and pieces[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(pieces[i])
                    i += 1
            pieces = merged
        result = tuple(pieces)
        self._cache[word] = result
        return result

    def _words(self, text: str) -> Iterable[str]:
        """Clean ``text`` and yield pre-tokenised words as byte symbols."""
        to_sym = self._byte_to_sym
        for word in _TOKEN_PATTERN.findall(_clean(text)):
            yield "".join(to_sym[b] for b in word.encode("utf-8"))

    # ----------------------------------------------------------- public API
    def tokenize(self, text: str) -> list[str]:
        """Return the BPE token strings of ``text``."""
        tokens: list[str] = []
        for word in self._words(text):
            tokens.extend(self._bpe(word))
        return tokens

    def encode(self, text: str) -> list[int]:
        """Return the token ids of ``text`` (no SOT/EOT added)."""
        enc = self.encoder
        return [enc[tok] for word in self._words(text) for tok in self._bpe(word)]

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        """Map BPE token strings (including specials) to ids."""
        ids = []
        for tok in tokens:
            try:
                ids.append(self.encoder[tok])
            except KeyError:
                raise KeyError(f"token {tok!r} is not in the CLIP vocabulary") from None
        return ids

    def convert_ids_to_tokens(self, ids: Iterable[int] | torch.Tensor) -> list[str]:
        """Map ids to BPE token strings."""
        out = []
        for i in self._as_id_list(ids):
            # Explicit bounds check: list indexing would accept negative ids.
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
            out.append(self.decoder[i])
        return out

    def decode(self, ids: Iterable[int] | torch.Tensor, stop_at_eot: bool = False) -> str:
        """Turn ids back into text.

        As in the original: tokens are concatenated, byte symbols decoded as
        UTF-8 (invalid sequences replaced) and every ``</w>`` becomes a space,
        so the result usually ends with a space and specials appear verbatim.
        With ``stop_at_eot`` everything from the first EOT on is dropped, as
        the original caption evaluation does before detokenising.
        """
        id_list = self._as_id_list(ids)
        if stop_at_eot and self.EOT in id_list:
            id_list = id_list[: id_list.index(self.EOT)]
        joined = "".join(self.convert_ids_to_tokens(id_list))
        data = bytes(self._sym_to_byte[c] for c in joined)
        return data.decode("utf-8", errors="replace").replace(_WORD_END, " ")

    def encode_texts(
        self,
        texts: Sequence[str],
        *,
        append_eot: bool = True,
        max_len: int | None = None,
    ) -> list[list[int]]:
        """Encode several texts, optionally appending EOT and truncating.

        EOT is added the way the original callers do it, by appending
        ``" <|endoftext|>"`` to the string before encoding. Truncation keeps
        the last id (``ids[:max_len-1] + [ids[-1]]``) so a trailing EOT
        survives, matching the original's dataset code.
        """
        if isinstance(texts, str):
            raise TypeError("encode_texts expects a sequence of strings, not a str")
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        out = []
        for text in texts:
            ids = self.encode(text + " <|endoftext|>" if append_eot else text)
            if max_len is not None and len(ids) > max_len:
                ids = ids[: max_len - 1] + [ids[-1]]
            out.append(ids)
        return out

    def batch_encode(
        self,
        texts: Sequence[str],
        *,
        append_eot: bool = True,
        max_len: int | None = None,
        pad_id: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and right-pad to the longest sequence.

        Returns ``(ids, padding_mask)``: a LongTensor ``[B, L]`` and a
        BoolTensor ``[B, L]`` that is True at padding positions.
        """
        return pad_ids(self.encode_texts(texts, append_eot=append_eot, max_len=max_len), pad=pad_id)

    # ------------------------------------------------------------- helpers
    @staticmethod
    def _as_id_list(ids: Iterable[int] | torch.Tensor) -> list[int]:
        """Accept a list/tuple of ints or a 1-D tensor/array of ids."""
        if hasattr(ids, "tolist") and hasattr(ids, "ndim"):
            if ids.ndim != 1:
                raise ValueError(f"expected a 1-D sequence of ids, got shape {tuple(ids.shape)}")
            return [int(i) for i in ids.tolist()]
        return [int(i) for i in ids]
