"""Offline cl100k_base token counting (bpe-openai ships its vocabulary: nothing is downloaded).

Any text is counted, whatever its size: bpe-openai refuses inputs above a
few hundred thousand characters ("Input too long to encode safely"), so text
is encoded in bounded pieces (cut at whitespace where there is some), and
beyond ``MAX_COUNTED_CHARS`` the rest is estimated from the counted part's
characters-per-token ratio. Counting never raises.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

import bpe_openai

log = logging.getLogger("gateway.tokenizer")

# Encoded at once (well below bpe-openai's own limit, ~2 ms of CPU each).
PIECE_CHARS = 100_000
# Counted exactly up to here (~40 ms of CPU); the rest is estimated.
MAX_COUNTED_CHARS = 2_000_000
# The estimate when nothing could be counted: about 4 characters per token.
_CHARS_PER_TOKEN = 4.0


@lru_cache(maxsize=1)
def _encoding() -> Any:
    return bpe_openai.get_encoding("cl100k_base")


def warm_up() -> None:
    """Load the vocabulary at start so the first request does not pay for it."""
    _encoding()


def _count_piece(text: str) -> int:
    try:
        # encode_ordinary: special-token text in a prompt is counted as plain text, never rejected.
        return len(_encoding().encode_ordinary(text))
    except ValueError:
        # A piece the encoder refuses (it has limits of its own): estimate it.
        return max(1, round(len(text) / _CHARS_PER_TOKEN))


def _pieces(text: str, limit: int) -> list[str]:
    pieces: list[str] = []
    start = 0
    end_of_text = min(len(text), limit)
    while start < end_of_text:
        end = min(start + PIECE_CHARS, end_of_text)
        if end < len(text):
            # Cut before a space: cl100k joins a space to the word after it, so the
            # pieces count what the whole would.
            cut = text.rfind(" ", start + PIECE_CHARS // 2, end)
            if cut > start:
                end = cut
        pieces.append(text[start:end])
        start = end
    return pieces


def count_tokens(text: str) -> int:
    if not text:
        return 0
    if len(text) <= PIECE_CHARS:
        return _count_piece(text)
    counted_chars = 0
    tokens = 0
    for piece in _pieces(text, MAX_COUNTED_CHARS):
        tokens += _count_piece(piece)
        counted_chars += len(piece)
    rest = len(text) - counted_chars
    if rest > 0:
        ratio = counted_chars / tokens if tokens else _CHARS_PER_TOKEN
        tokens += round(rest / max(ratio, 1.0))
    return tokens
