"""The seam between the generic completions pipeline and each provider.

A ``Provider`` is built once at start for one route (it knows its config
and master allowlist). For every request it ``parse``s the client body into
a ``ProviderCall``: a small object, created per request and not shared, that
holds the transformed upstream request and the stream state used to count
usage. Methods run in this order:

1. ``Provider.parse``        decode known fields, validate, transform (raises BadRequest)
2. ``ProviderCall.upstream_request``   URL, headers, body to send
3. ``ProviderCall.feed``     every body chunk of a 2xx response; returns the bytes to
                             relay (None: relay the chunk as it is)
4. ``ProviderCall.finish``   once, when the body ended or was cut short
5. ``ProviderCall.usage``    the counts for the usage event
``stream_error_event`` renders an in-band, provider-shaped error for a
stream that fails after its first byte reached the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson


@dataclass(slots=True)
class Usage:
    """Counts for one request; None means "not known", never zero or -1."""

    prompt_chars: int | None = None
    prompt_tokens: int | None = None
    prompt_tokenizer_tokens: int | None = None
    completion_chars: int | None = None
    completion_tokens: int | None = None
    completion_tokenizer_tokens: int | None = None
    # Components, as the provider reported them (None: not reported). Cache
    # reads and writes are part of ``prompt_tokens``; reasoning tokens are part
    # of ``completion_tokens``: these say how much of each total they are.
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None
    reasoning_tokens: int | None = None

    def total_tokens(self) -> int | None:
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)

    def event_fields(self) -> dict[str, int | None]:
        return {
            "prompt_character_count": self.prompt_chars,
            "prompt_token_count": self.prompt_tokens,
            "prompt_tokenizer_token_count": self.prompt_tokenizer_tokens,
            "completion_character_count": self.completion_chars,
            "completion_token_count": self.completion_tokens,
            "completion_tokenizer_token_count": self.completion_tokenizer_tokens,
            "prompt_cache_read_token_count": self.cache_read_tokens,
            "prompt_cache_creation_token_count": self.cache_creation_tokens,
            "completion_reasoning_token_count": self.reasoning_tokens,
        }


# In every provider's headers, built once: the relay counts and parses the bytes it
# passes on, which a compressed body would hide (the transport adds it to any request
# without it, at the cost of a copy per request).
IDENTITY_ENCODING = {"Accept-Encoding": "identity"}


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    url: str
    headers: Mapping[str, str]
    body: bytes


def json_body(value: Any) -> bytes:
    """``value`` as compact JSON, in a bytes object of its own size.

    orjson returns its whole output buffer (at least 4 KB, measured with
    tracemalloc), and a request body lives as long as its stream: with
    thousands of open streams that slack was ~4 KB of RSS each.
    """
    return bytes(memoryview(orjson.dumps(value)))


@dataclass(frozen=True, slots=True)
class FlagInput:
    """What the abuse heuristics look at (reference 4.7)."""

    model: str
    prompt: str
    max_tokens: int
    uses_tokenizer: bool


@dataclass(slots=True)
class CallInfo:
    """What the pipeline needs to know about a parsed request."""

    model: str
    stream: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    # Top-level request fields the gateway does not know and did not forward
    # (their names, bounded): for the unknown-fields metric.
    dropped_fields: tuple[str, ...] = ()


class ProviderCall(Protocol):
    info: CallInfo
    # The provider's own error event inside a 2xx stream.
    in_band_error: str | None
    # The provider broke its wire format (undecodable or oversized event).
    protocol_error: str | None

    def upstream_request(self) -> UpstreamRequest: ...

    def flag_input(self) -> FlagInput | None: ...

    def feed(self, chunk: bytes) -> bytes | None:
        """Watch a relayed chunk; returns what to relay instead (None: the chunk itself)."""
        ...

    def finish(self) -> None: ...

    def usage(self) -> Usage: ...

    def stream_error_event(self, message: str) -> bytes: ...


class Provider(Protocol):
    name: str
    operation: str
    default_retry_after_s: int
    allowed_models: tuple[str, ...]
    """The master allowlist, each entry prefixed ``<provider>/``."""

    def parse(
        self, body: bytes, *, feature: str, identifier: str, headers: Mapping[str, str]
    ) -> ProviderCall: ...

    def virtual_models(self) -> dict[str, frozenset[str]]:
        """Allowlist entries that admit other concrete ids (lower-cased)."""
        ...

    def __hash__(self) -> int:
        """Providers are hashable (by identity): per-provider results are cached with them as keys."""
        ...
