"""Offline cl100k_base token counting (bpe-openai ships its vocabulary: nothing is downloaded)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import bpe_openai


@lru_cache(maxsize=1)
def _encoding() -> Any:
    return bpe_openai.get_encoding("cl100k_base")


def warm_up() -> None:
    """Load the vocabulary at start so the first request does not pay for it."""
    _encoding()


def count_tokens(text: str) -> int:
    if not text:
        return 0
    # encode_ordinary: special-token text in a prompt is counted as plain text, never rejected.
    return len(_encoding().encode_ordinary(text))
