"""Spans of the prompt that eviction keeps or drops as a whole (option ``spans``).

Most tokenizers write a number one token per digit (SmolLM2, Gemma 3) or per group of up to
three digits (Llama 3). A question about a number attends to the words around it, and SnapKV's
pooling (kernel 7) reaches only the first digits after them, so a compressed cache kept "3" of
"30417" in most heads and lost the rest (docs/SELECTION.md). With ``spans="numbers"`` every
cell of a number ranks with the number's best cell (:func:`adakv_local.pooling.raise_spans`),
so a number is kept whole or not at all; ``spans="long-numbers"`` only for numbers of at least
:data:`LONG_NUMBER_DIGITS` digits (a section number "5.3." or a version "1.12" ranks cell by
cell: pooling already reaches a short number's digits, and keeping every one whole took cells from
the words around them; docs/SELECTION.md); ``spans="words"`` does the same for every word split
into several tokens (numbers included). Budget accounting is unchanged: only the ranking moves.

A number here: a run of tokens made only of ASCII digits, the first of which may carry leading
whitespace; a single ``.``, ``,``, ``:``, ``-`` or ``/`` between two digit tokens belongs to it
(3.14, 1,024, 12:30, 2024-01-15), and so does the token that follows it unless that one starts
another number: kept without the token that ends it, a number was read as the start of a longer
one (pass key 30417 answered "30417732"; docs/SELECTION.md). A word: a token without leading
whitespace that starts with a letter or digit continues the previous token when that one ends
with a letter or digit.

This module needs only the tokens' text: :class:`SpanFinder` takes a function from a token id
to its piece (bytes) and caches the classification of the ids it has seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["SPAN_MODES", "SpanFinder", "span_ids"]

#: "none": every cell ranks on its own (SnapKV). "numbers", "long-numbers", "words": see the module's text.
SPAN_MODES = ("none", "numbers", "long-numbers", "words")

#: "long-numbers": the fewest digits a number needs to be kept whole
LONG_NUMBER_DIGITS = 4

_SEPARATORS = frozenset(".,:-/")

# token classes, as bits
_DIGITS = 1  # only ASCII digits, after any leading whitespace
_SEP = 2  # exactly one separator character
_SPACE = 4  # starts with whitespace
_ALNUM_START = 8  # first character (after nothing) is a letter or digit
_ALNUM_END = 16  # last character is a letter or digit
_N_DIGITS = 8  # bits from here: how many digits a _DIGITS token holds (at most 255)


def _classify(piece: str) -> int:
    if not piece:
        return 0
    bits = 0
    body = piece.lstrip()
    if piece[0].isspace():
        bits |= _SPACE
    if body and body.isascii() and body.isdigit():
        bits |= _DIGITS | (min(len(body), 255) << _N_DIGITS)
    if piece in _SEPARATORS:
        bits |= _SEP
    if piece[0].isalnum():
        bits |= _ALNUM_START
    if piece[-1].isalnum():
        bits |= _ALNUM_END
    return bits


def span_ids(classes: np.ndarray, mode: str) -> np.ndarray:
    """Span ids (int64, non-decreasing) of a token sequence given its classes (see ``_classify``):
    tokens that continue the previous token's span share its id."""
    if mode not in SPAN_MODES:
        raise ValueError(f"spans must be one of {', '.join(SPAN_MODES)}, got {mode!r}")
    c = np.asarray(classes, dtype=np.int64)
    n = c.size
    cont = np.zeros(n, dtype=bool)
    if mode != "none" and n > 1:
        digit = (c & _DIGITS) != 0
        space = (c & _SPACE) != 0
        sep = (c & _SEP) != 0
        tight_digit = digit & ~space  # a digit token that can continue a number
        # a separator between two digit tokens: 3.14
        sep_in = np.zeros(n, dtype=bool)
        sep_in[1:-1] = sep[1:-1] & digit[:-2] & tight_digit[2:]
        cont[1:] = tight_digit[1:] & (digit[:-1] | sep_in[:-1])
        cont |= sep_in
        # the token after a number ends it ("30417." / "30417 is"): without it a model that sees the
        # digits goes on writing digits ("304177")
        cont[1:] |= digit[:-1] & ~cont[1:] & ~digit[1:]
        if mode == "long-numbers":  # a number of fewer digits: every cell a span of its own
            ids = np.cumsum(~cont)
            digits = np.bincount(ids, weights=(c >> _N_DIGITS) * digit)
            cont &= digits[ids] >= LONG_NUMBER_DIGITS
        if mode == "words":
            cont[1:] |= ((c[1:] & (_ALNUM_START | _SPACE)) == _ALNUM_START) & ((c[:-1] & _ALNUM_END) != 0)
    return np.cumsum(~cont) - 1


class SpanFinder:
    """Span ids of token sequences for one vocabulary (``piece``: token id -> its bytes)."""

    def __init__(self, piece: Callable[[int], bytes]) -> None:
        self._piece = piece
        self._classes: dict[int, int] = {}

    def classes(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """The class bits of each token (looked up once per distinct id)."""
        toks = np.asarray(tokens, dtype=np.int64)
        uniq, inverse = np.unique(toks, return_inverse=True)
        for t in uniq.tolist():
            if t not in self._classes:
                self._classes[t] = _classify(self._piece(t).decode("utf-8", errors="replace"))
        table = np.array([self._classes[t] for t in uniq.tolist()], dtype=np.int64)
        return table[inverse].reshape(toks.shape)

    def ids(self, tokens: Sequence[int] | np.ndarray, mode: str) -> np.ndarray:
        """The span id of each token of the sequence (position order)."""
        return span_ids(self.classes(tokens), mode)
