"""A fake LLM provider that speaks the real providers' wire formats.

One Tornado server answers the upstream routes the gateway forwards to
(Anthropic Messages and legacy Complete, OpenAI chat and embeddings,
Fireworks chat and text completions, Google Gemini, KServe v2 inference) with
the same status codes, headers, JSON shapes and SSE framing as the real APIs.
Latency, token counts and failures are steered per request by ``X-Fake-<name>``
headers or by ``fake:<name>=<value>`` directives anywhere in the raw body (the
gateway forwards prompt text verbatim, not arbitrary headers). The full
contract, with an example per directive, is in docs/fake-provider.md.

Standalone on purpose: it imports nothing from the gateway, so it can run as
its own process (``python fakes/provider.py --port 8080``) or inside the
gateway's loop for ``--demo`` (``await start_fake_provider()``).

Hot path notes: load tests push tens of thousands of SSE events per second
from here on two cores, so every content event is a byte template filled by
concatenation (no per-chunk ``json.dumps``), there is no access logging, and
unpaced streams go out as one write.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import functools
import hashlib
import itertools
import json
import logging
import math
import re
import secrets
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import tornado.httpserver
import tornado.httputil
import tornado.iostream
import tornado.netutil
import tornado.web

__all__ = [
    "COMPLETION_WORDS",
    "DIRECTIVES",
    "FakeProvider",
    "completion_text",
    "count_words",
    "embedding_dimensions",
    "embedding_vector",
    "make_app",
    "start_fake_provider",
]

# --------------------------------------------------------------------------
# Directives


def _nonneg_int(value: Any) -> int:
    # float() first so "20", "20.0", "20." (end of a sentence) all parse.
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(value)
    return max(0, int(number))


def _nonneg_float(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(value)
    return max(0.0, number)


def _status(value: Any) -> int:
    code = _nonneg_int(value)
    if not 200 <= code <= 599:
        raise ValueError(value)
    return code


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() not in ("", "0", "false", "no", "off")


def _text(value: Any) -> str:
    text = str(value).strip()
    if not text or "\r" in text or "\n" in text:
        raise ValueError(value)
    return text


# Every per-request knob and how its value is parsed. A value that does not
# parse is ignored, like an unknown name.
DIRECTIVES: dict[str, Callable[[Any], Any]] = {
    "ttft_ms": _nonneg_float,
    "tokens": _nonneg_int,
    "tokens_per_s": _nonneg_float,
    "input_tokens": _nonneg_int,
    "status": _status,
    "retry_after": _text,
    "fail_times": _nonneg_int,
    "fail_key": _text,
    "disconnect_after": _nonneg_int,
    "stall_after": _nonneg_int,
    "error_after": _nonneg_int,
    "malformed": _flag,
    "content_type": _text,
    "no_usage": _flag,
    "huge_event_bytes": _nonneg_int,
    "invalid_utf8": _flag,
    # Tool use, thinking and usage components (issue 15).
    "tool_use": _text,
    "thinking": _flag,
    "cache_read": _nonneg_int,
    "cache_creation": _nonneg_int,
    "reasoning_tokens": _nonneg_int,
}

_BASE_DEFAULTS: dict[str, Any] = {"ttft_ms": 0.0, "tokens": 20, "tokens_per_s": 0.0}

# Server options that are not per-request directives.
_SERVER_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "request_log_size": _nonneg_int,
    "stall_cap_s": _nonneg_float,
}
_DEFAULT_REQUEST_LOG_SIZE = 1000
_DEFAULT_STALL_CAP_S = 300.0
_MAX_FAIL_KEYS = 10_000

# Names are lower case (digits allowed, as in invalid_utf8); the value stops at the first character outside the
# set, so a directive inside a JSON string ends at the closing quote or at a
# backslash escape. Values are percent-decoded afterwards.
_DIRECTIVE_RE = re.compile(rb"fake:([a-z0-9_]+)=([A-Za-z0-9_.:/%+=-]+)")
_HEADER_PREFIX = "x-fake-"


def _apply_directive(opts: dict[str, Any], name: str, value: Any) -> None:
    parse = DIRECTIVES.get(name)
    if parse is None:
        return
    try:
        opts[name] = parse(value)
    except (ValueError, TypeError, OverflowError):
        pass


# --------------------------------------------------------------------------
# Deterministic content

COMPLETION_WORDS: tuple[str, ...] = (
    "Hello", "from", "the", "fake", "provider", "streaming", "one", "word",
    "per", "token", "so", "tests", "can", "count", "every", "chunk",
)  # fmt: skip


def completion_text(tokens: int) -> str:
    """The text a completion of ``tokens`` content chunks carries.

    Chunk i is ``COMPLETION_WORDS[i % 16]``, with a leading space for i > 0,
    so the text always has exactly ``tokens`` whitespace-separated words.
    """
    return " ".join(COMPLETION_WORDS[i % len(COMPLETION_WORDS)] for i in range(tokens))


def _escaped(text: str) -> bytes:
    """JSON string contents (without the quotes) as bytes."""
    return json.dumps(text)[1:-1].encode()


_FIRST_PIECE = _escaped(COMPLETION_WORDS[0])
_REST_PIECES = tuple(_escaped(" " + word) for word in COMPLETION_WORDS)


def _pieces(tokens: int) -> list[bytes]:
    pieces = [_REST_PIECES[i % len(_REST_PIECES)] for i in range(tokens)]
    if pieces:
        pieces[0] = _FIRST_PIECE
    return pieces


def count_words(value: Any) -> int:
    """Whitespace-separated words in a prompt value, as the fake counts tokens.

    Strings count their words; lists add up their items; a dict counts its
    ``text`` and ``content`` (and Gemini's ``parts``) fields. Integers in a
    list (pre-tokenised embedding input) count one token each.
    """
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(1 if isinstance(item, int) and not isinstance(item, bool) else count_words(item) for item in value)
    if isinstance(value, dict):
        return count_words(value.get("text")) + count_words(value.get("content")) + count_words(value.get("parts"))
    return 0


_EMBEDDING_DIMENSIONS = {
    "text-embedding-ada-002": 1536,
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
}
_KSERVE_DIMENSIONS = 768


def embedding_dimensions(model: str) -> int:
    """Vector length the fake returns for an OpenAI embeddings model."""
    return _EMBEDDING_DIMENSIONS.get(model.removeprefix("openai/"), 1536)


@functools.lru_cache(maxsize=4096)
def _vector(seed: bytes, dims: int) -> tuple[bytes, bytes]:
    """(JSON number list without brackets, little-endian float32 bytes).

    Unit-length float32 values derived from SHAKE-256 of the seed. JSON uses
    9 significant digits, which round-trips float32 exactly, so the float and
    base64 encodings decode to the same float32 vector.
    """
    halves = array.array("H", hashlib.shake_256(seed).digest(2 * dims))
    if sys.byteorder == "big":
        halves.byteswap()
    centred = [h - 32767.5 for h in halves]
    norm = math.sqrt(math.fsum(v * v for v in centred))
    floats = array.array("f", [v / norm for v in centred])
    text = ",".join([f"{v:.9g}" for v in floats]).encode()
    if sys.byteorder == "big":
        floats.byteswap()
    return text, floats.tobytes()


def _seed(item: Any) -> bytes:
    if isinstance(item, str):
        return item.encode("utf-8", "surrogatepass")
    return b"tokens:" + json.dumps(item, separators=(",", ":")).encode()


def embedding_vector(text: str, dims: int = 1536) -> list[float]:
    """The float32 vector the fake returns for ``text`` (as Python floats)."""
    raw = _vector(_seed(text), dims)[1]
    floats = array.array("f")
    floats.frombytes(raw)
    if sys.byteorder == "big":
        floats.byteswap()
    return floats.tolist()


# --------------------------------------------------------------------------
# State shared by the handlers of one server


class FakeState:
    """Counters, the request log and retry bookkeeping of one fake server."""

    def __init__(self, defaults: dict[str, Any], request_log_size: int, stall_cap_s: float) -> None:
        self.defaults = defaults
        self.stall_cap_s = stall_cap_s
        self.in_flight = 0
        self.max_in_flight = 0
        self.total = 0
        self.client_disconnects = 0
        self.requests: deque[dict[str, Any]] = deque(maxlen=request_log_size)
        self.fail_counts: dict[str, int] = {}
        self._prefix = secrets.token_hex(4)
        self._ids = itertools.count(1)

    def begin(self) -> None:
        self.total += 1
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight

    def end(self, client_left: bool) -> None:
        self.in_flight -= 1
        if client_left:
            self.client_disconnects += 1

    def next_id(self) -> str:
        return f"{self._prefix}{next(self._ids):012x}"

    def count_attempt(self, key: str) -> int:
        if len(self.fail_counts) >= _MAX_FAIL_KEYS and key not in self.fail_counts:
            self.fail_counts.clear()
        attempt = self.fail_counts.get(key, 0) + 1
        self.fail_counts[key] = attempt
        return attempt

    def stats(self) -> dict[str, int]:
        return {
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "total": self.total,
            "client_disconnects": self.client_disconnects,
        }

    def reset(self) -> None:
        # Streams still running will decrement in_flight when they end, so it
        # is kept; the high-water mark restarts from it.
        self.max_in_flight = self.in_flight
        self.total = 0
        self.client_disconnects = 0
        self.requests.clear()
        self.fail_counts.clear()


# --------------------------------------------------------------------------
# Wire formats


@dataclass(slots=True)
class Request:
    """What a wire format read from the request body."""

    stream: bool
    model: str
    prompt_tokens: int
    max_tokens: int | None = None
    include_usage: bool = False
    cumulative: bool = False
    sse: bool = True


@dataclass(slots=True)
class Completion:
    """Everything a wire format needs to render one completion."""

    id: bytes
    model: bytes  # JSON-encoded, quotes included
    created: int
    input_tokens: int
    tokens: int
    pieces: list[bytes]  # JSON-escaped text of each content chunk, no quotes
    usage: bool
    include_usage: bool
    hit_max: bool
    cumulative: bool
    sse: bool
    # Tool call name (tool_use directive), thinking block, usage components.
    tool: str | None = None
    thinking: bool = False
    cache_read: int | None = None
    cache_creation: int | None = None
    reasoning_tokens: int | None = None


# The arguments every fake tool call carries.
TOOL_INPUT: dict[str, Any] = {"location": "Paris", "unit": "celsius"}
_TOOL_INPUT_JSON = json.dumps(TOOL_INPUT, separators=(",", ":"))
THINKING_TEXT = "Let me think about this step by step."
THINKING_SIGNATURE = "fake-signature-" + "a" * 16


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class Wire:
    """Error shape and content types of one provider."""

    json_type = "application/json"
    stream_type = "text/event-stream; charset=utf-8"
    server = "cloudflare"  # what the real API's responses say, instead of Tornado's banner

    def error_body(self, status: int) -> bytes:
        raise NotImplementedError

    def headers(self, request_id: str) -> Iterable[tuple[str, str]]:
        return ()


class CompletionWire(Wire):
    """A provider's completions: request reading and response rendering.

    A stream is ``head`` + ``chunk(i)`` for each content token + ``tail``;
    faults cut it after some chunks (see the handler).
    """

    default_stream_error = 500

    def read(self, body: dict[str, Any], args: tuple[str, ...], request: tornado.httputil.HTTPServerRequest) -> Request:
        raise NotImplementedError

    def head(self, c: Completion) -> bytes:
        return b""

    def chunk(self, c: Completion, i: int) -> bytes:
        raise NotImplementedError

    def tail(self, c: Completion) -> bytes:
        raise NotImplementedError

    def stream_error(self, c: Completion, status: int, sent: int) -> bytes:
        raise NotImplementedError

    def body(self, c: Completion) -> bytes:
        raise NotImplementedError


# Anthropic ----------------------------------------------------------------

_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request"),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


def _anthropic_error(status: int) -> bytes:
    kind, message = _ANTHROPIC_ERRORS.get(
        status, ("invalid_request_error" if status < 500 else "api_error", f"fake provider error {status:d}")
    )
    return _dumps({"type": "error", "error": {"type": kind, "message": message}})


class _AnthropicWire(CompletionWire):
    default_stream_error = 529

    def error_body(self, status: int) -> bytes:
        return _anthropic_error(status)

    def headers(self, request_id: str) -> Iterable[tuple[str, str]]:
        return (("request-id", "req_" + request_id),)


_AM_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"'
)
_AM_DELTA_END = b'"}}\n\n'
_AM_BLOCK_START = (
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
    b'event: ping\ndata: {"type": "ping"}\n\n'
)
_AM_BLOCK_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
_AM_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def _am_cache_usage(c: Completion) -> bytes:
    out = b""
    if c.cache_creation is not None:
        out += b',"cache_creation_input_tokens":%d' % c.cache_creation
    if c.cache_read is not None:
        out += b',"cache_read_input_tokens":%d' % c.cache_read
    return out


def _am_extra_blocks_stream(c: Completion) -> tuple[bytes, bytes]:
    """(blocks before the text block, blocks after it), and the text block's index."""
    before = b""
    if c.thinking:
        before = b"".join((
            b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
            + b'"content_block":{"type":"thinking","thinking":"","signature":""}}\n\n',
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            + b'"delta":{"type":"thinking_delta","thinking":' + _dumps(THINKING_TEXT) + b"}}\n\n",
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            + b'"delta":{"type":"signature_delta","signature":' + _dumps(THINKING_SIGNATURE) + b"}}\n\n",
            b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
        ))  # fmt: skip
    after = b""
    if c.tool:
        index = 2 if c.thinking else 1
        half = len(_TOOL_INPUT_JSON) // 2
        after = b"".join((
            b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,' % index,
            b'"content_block":{"type":"tool_use","id":"toolu_', c.id, b'","name":', _dumps(c.tool), b',"input":{}}}\n\n',
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,' % index,
            b'"delta":{"type":"input_json_delta","partial_json":', _dumps(_TOOL_INPUT_JSON[:half]), b"}}\n\n",
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,' % index,
            b'"delta":{"type":"input_json_delta","partial_json":', _dumps(_TOOL_INPUT_JSON[half:]), b"}}\n\n",
            b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n' % index,
        ))  # fmt: skip
    return before, after


def _am_index(c: Completion) -> bytes:
    return b"1" if c.thinking else b"0"


class AnthropicMessages(_AnthropicWire):
    """``POST /v1/messages``.

    ``tool_use=NAME`` adds a tool_use block (input ``TOOL_INPUT``, streamed as
    two ``input_json_delta``) and stops with ``tool_use``; ``thinking=1`` puts a
    thinking block (with signature) first; ``cache_read`` / ``cache_creation``
    add those usage fields.
    """


    def read(self, body: dict[str, Any], args: tuple[str, ...], request: tornado.httputil.HTTPServerRequest) -> Request:
        messages = body.get("messages")
        return Request(
            stream=body.get("stream") is True,
            model=str(body.get("model") or ""),
            prompt_tokens=count_words(body.get("system")) + count_words(messages if isinstance(messages, list) else None),
            max_tokens=_int_or_none(body.get("max_tokens")),
        )

    def head(self, c: Completion) -> bytes:
        usage = (
            b',"usage":{"input_tokens":%d,"output_tokens":1%s}' % (c.input_tokens, _am_cache_usage(c)) if c.usage else b""
        )
        block_start = _AM_BLOCK_START
        before = b""
        if c.thinking or c.tool:
            before, _ = _am_extra_blocks_stream(c)
            block_start = _AM_BLOCK_START.replace(b'"index":0', b'"index":' + _am_index(c))
        return b"".join((
            b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_', c.id,
            b'","type":"message","role":"assistant","model":', c.model,
            b',"content":[],"stop_reason":null,"stop_sequence":null', usage, b"}}\n\n",
            before, block_start,
        ))  # fmt: skip

    def chunk(self, c: Completion, i: int) -> bytes:
        if c.thinking:
            return _AM_DELTA.replace(b'"index":0', b'"index":1') + c.pieces[i] + _AM_DELTA_END
        return _AM_DELTA + c.pieces[i] + _AM_DELTA_END

    def _stop_reason(self, c: Completion) -> bytes:
        if c.tool:
            return b"tool_use"
        return b"max_tokens" if c.hit_max else b"end_turn"

    def tail(self, c: Completion) -> bytes:
        usage = (
            b',"usage":{"input_tokens":%d,"output_tokens":%d%s}' % (c.input_tokens, c.tokens, _am_cache_usage(c))
            if c.usage and (c.cache_read is not None or c.cache_creation is not None)
            else b',"usage":{"output_tokens":%d}' % c.tokens if c.usage else b""
        )
        after = _am_extra_blocks_stream(c)[1] if c.tool else b""
        block_stop = _AM_BLOCK_STOP.replace(b'"index":0', b'"index":' + _am_index(c))
        return b"".join((
            block_stop, after,
            b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"', self._stop_reason(c),
            b'","stop_sequence":null}', usage, b"}\n\n",
            _AM_STOP,
        ))  # fmt: skip

    def stream_error(self, c: Completion, status: int, sent: int) -> bytes:
        return b"event: error\ndata: " + _anthropic_error(status) + b"\n\n"

    def body(self, c: Completion) -> bytes:
        usage = (
            b',"usage":{"input_tokens":%d,"output_tokens":%d%s}' % (c.input_tokens, c.tokens, _am_cache_usage(c))
            if c.usage
            else b""
        )
        before = b""
        if c.thinking:
            before = b'{"type":"thinking","thinking":%s,"signature":%s},' % (
                _dumps(THINKING_TEXT), _dumps(THINKING_SIGNATURE)
            )
        after = b""
        if c.tool:
            after = b',{"type":"tool_use","id":"toolu_%s","name":%s,"input":%s}' % (
                c.id, _dumps(c.tool), _TOOL_INPUT_JSON.encode()
            )
        return b"".join((
            b'{"id":"msg_', c.id, b'","type":"message","role":"assistant","model":', c.model,
            b',"content":[', before, b'{"type":"text","text":"', b"".join(c.pieces), b'"}', after,
            b'],"stop_reason":"', self._stop_reason(c), b'","stop_sequence":null', usage, b"}",
        ))  # fmt: skip


class AnthropicCountTokens(Wire):
    """``POST /v1/messages/count_tokens``: ``{"input_tokens": N}`` (one per word)."""

    def error_body(self, status: int) -> bytes:
        return _anthropic_error(status)

    def render(self, body: dict[str, Any]) -> bytes:
        messages = body.get("messages")
        tokens = count_words(body.get("system")) + count_words(messages if isinstance(messages, list) else None)
        return _dumps({"input_tokens": tokens})


class AnthropicComplete(_AnthropicWire):
    """``POST /v1/complete`` (legacy text completions).

    The streaming shape follows the ``anthropic-version`` header as the real
    API does: from 2023-06-01 on (and when the header is absent) named
    ``completion`` events carry incremental text; before that, data-only
    events carry the cumulative text and the stream ends with ``[DONE]``.
    The reference gateway sends 2023-01-01 and keeps only the last event.
    """

    def read(self, body: dict[str, Any], args: tuple[str, ...], request: tornado.httputil.HTTPServerRequest) -> Request:
        version = request.headers.get("anthropic-version", "").strip()
        return Request(
            stream=body.get("stream") is True,
            model=str(body.get("model") or ""),
            prompt_tokens=count_words(body.get("prompt")),
            max_tokens=_int_or_none(body.get("max_tokens_to_sample")),
            cumulative=bool(version) and version < "2023-06-01",
        )

    def _stop(self, c: Completion) -> bytes:
        if c.hit_max:
            return b'"stop_reason":"max_tokens","model":%s,"stop":null' % c.model
        return b'"stop_reason":"stop_sequence","model":%s,"stop":"\\n\\nHuman:"' % c.model

    def head(self, c: Completion) -> bytes:
        return b"" if c.cumulative else b'event: ping\ndata: {"type": "ping"}\n\n'

    def _cumulative_event(self, c: Completion, upto: int, stop: bytes) -> bytes:
        return b"".join((
            b'data: {"completion":"', b"".join(c.pieces[:upto]), b'",', stop,
            b',"truncated":false,"log_id":"compl_', c.id, b'","exception":null}\n\n',
        ))  # fmt: skip

    def chunk(self, c: Completion, i: int) -> bytes:
        if c.cumulative:
            return self._cumulative_event(c, i + 1, b'"stop_reason":null,"model":%s,"stop":null' % c.model)
        return b"".join((
            b'event: completion\ndata: {"type":"completion","id":"compl_', c.id, b'","completion":"', c.pieces[i],
            b'","stop_reason":null,"model":', c.model, b',"stop":null,"log_id":"compl_', c.id, b'"}\n\n',
        ))  # fmt: skip

    def tail(self, c: Completion) -> bytes:
        if c.cumulative:
            return self._cumulative_event(c, c.tokens, self._stop(c)) + b"data: [DONE]\n\n"
        return b"".join((
            b'event: completion\ndata: {"type":"completion","id":"compl_', c.id, b'","completion":"",',
            self._stop(c), b',"log_id":"compl_', c.id, b'"}\n\n',
        ))  # fmt: skip

    def stream_error(self, c: Completion, status: int, sent: int) -> bytes:
        prefix = b"data: " if c.cumulative else b"event: error\ndata: "
        return prefix + _anthropic_error(status) + b"\n\n"

    def body(self, c: Completion) -> bytes:
        return b"".join((
            b'{"type":"completion","id":"compl_', c.id, b'","completion":"', b"".join(c.pieces), b'",',
            self._stop(c), b',"log_id":"compl_', c.id, b'"}',
        ))  # fmt: skip


# OpenAI and Fireworks -------------------------------------------------------

_OPENAI_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("invalid_request_error", "Invalid request", None),
    401: ("invalid_request_error", "Incorrect API key provided.", "invalid_api_key"),
    403: ("invalid_request_error", "Country, region, or territory not supported.", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "The model does not exist or you do not have access to it.", "model_not_found"),
    429: ("requests", "Rate limit reached for requests.", "rate_limit_exceeded"),
    500: ("server_error", "The server had an error while processing your request. Sorry about that!", None),
    503: ("server_error", "The engine is currently overloaded, please try again later.", None),
}


def _openai_error(status: int) -> bytes:
    kind, message, code = _OPENAI_ERRORS.get(
        status, ("invalid_request_error" if status < 500 else "server_error", f"fake provider error {status:d}", None)
    )
    return _dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def _openai_usage(c: Completion) -> bytes:
    completion = c.tokens + (c.reasoning_tokens or 0)
    details = b""
    if c.cache_read is not None:
        details += b',"prompt_tokens_details":{"cached_tokens":%d,"audio_tokens":0}' % c.cache_read
    if c.reasoning_tokens is not None:
        details += b',"completion_tokens_details":{"reasoning_tokens":%d,"audio_tokens":0}' % c.reasoning_tokens
    return b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d%s}' % (
        c.input_tokens,
        completion,
        c.input_tokens + completion,
        details,
    )


def _openai_tool_call_delta(c: Completion) -> bytes:
    return b'{"tool_calls":[{"index":0,"id":"call_%s","type":"function","function":{"name":%s,"arguments":%s}}]}' % (
        c.id, _dumps(c.tool or ""), _dumps(_TOOL_INPUT_JSON)
    )


def _tool_calls_member(c: Completion) -> bytes:
    if not c.tool:
        return b""
    return b',"tool_calls":[{"id":"call_%s","type":"function","function":{"name":%s,"arguments":%s}}]' % (
        c.id, _dumps(c.tool), _dumps(_TOOL_INPUT_JSON)
    )


def _chat_messages_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    return count_words(messages) if isinstance(messages, list) else 0


class _OpenAIStyle(CompletionWire):
    """Shared by OpenAI and Fireworks: ``data: {json}\\n\\n`` then ``data: [DONE]``."""


    def error_body(self, status: int) -> bytes:
        return _openai_error(status)

    def headers(self, request_id: str) -> Iterable[tuple[str, str]]:
        return (("x-request-id", "req_" + request_id),)

    def stream_error(self, c: Completion, status: int, sent: int) -> bytes:
        return b"data: " + _openai_error(status) + b"\n\n"

    def _finish(self, c: Completion) -> bytes:
        return b"length" if c.hit_max else b"stop"

    def read(self, body: dict[str, Any], args: tuple[str, ...], request: tornado.httputil.HTTPServerRequest) -> Request:
        options = body.get("stream_options")
        return Request(
            stream=body.get("stream") is True,
            model=str(body.get("model") or ""),
            prompt_tokens=_chat_messages_tokens(body),
            max_tokens=_int_or_none(body.get("max_completion_tokens")) or _int_or_none(body.get("max_tokens")),
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        )


class OpenAIChat(_OpenAIStyle):
    """``POST /v1/chat/completions``: usage only in a final ``choices: []``
    chunk, and only when ``stream_options.include_usage`` is true."""

    def _prefix(self, c: Completion) -> bytes:
        return b"".join((
            b'data: {"id":"chatcmpl-', c.id, b'","object":"chat.completion.chunk","created":%d,"model":' % c.created,
            c.model, b',"system_fingerprint":"fp_fake","choices":[{"index":0,"delta":',
        ))  # fmt: skip

    def _end(self, c: Completion) -> bytes:
        return b',"usage":null}\n\n' if c.include_usage else b"}\n\n"

    def head(self, c: Completion) -> bytes:
        return b"".join((
            self._prefix(c), b'{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]',
            self._end(c),
        ))  # fmt: skip

    def chunk(self, c: Completion, i: int) -> bytes:
        return b"".join((
            self._prefix(c), b'{"content":"', c.pieces[i], b'"},"logprobs":null,"finish_reason":null}]', self._end(c),
        ))  # fmt: skip

    def _finish(self, c: Completion) -> bytes:
        if c.tool:
            return b"tool_calls"
        return b"length" if c.hit_max else b"stop"

    def tail(self, c: Completion) -> bytes:
        parts = []
        if c.tool:
            parts += [self._prefix(c), _openai_tool_call_delta(c), b',"logprobs":null,"finish_reason":null}]', self._end(c)]
        parts += [
            self._prefix(c), b'{},"logprobs":null,"finish_reason":"', self._finish(c), b'"}]', self._end(c),
        ]  # fmt: skip
        if c.include_usage and c.usage:
            parts += [
                b'data: {"id":"chatcmpl-', c.id, b'","object":"chat.completion.chunk","created":%d,"model":' % c.created,
                c.model, b',"system_fingerprint":"fp_fake","choices":[],"usage":', _openai_usage(c), b"}\n\n",
            ]  # fmt: skip
        parts.append(b"data: [DONE]\n\n")
        return b"".join(parts)

    def body(self, c: Completion) -> bytes:
        usage = b',"usage":' + _openai_usage(c) if c.usage else b""
        return b"".join((
            b'{"id":"chatcmpl-', c.id, b'","object":"chat.completion","created":%d,"model":' % c.created, c.model,
            b',"choices":[{"index":0,"message":{"role":"assistant","content":"', b"".join(c.pieces),
            b'","refusal":null', _tool_calls_member(c), b'},"logprobs":null,"finish_reason":"', self._finish(c), b'"}]',
            usage, b',"system_fingerprint":"fp_fake"}',
        ))  # fmt: skip


class FireworksChat(_OpenAIStyle):
    """``POST /inference/v1/chat/completions``: like OpenAI, but every chunk
    has ``"usage":null`` and the finish chunk always carries the usage."""

    def _prefix(self, c: Completion) -> bytes:
        return b"".join((
            b'data: {"id":"chatcmpl-', c.id, b'","object":"chat.completion.chunk","created":%d,"model":' % c.created,
            c.model, b',"choices":[{"index":0,"delta":',
        ))  # fmt: skip

    def head(self, c: Completion) -> bytes:
        return self._prefix(c) + b'{"role":"assistant"},"finish_reason":null}],"usage":null}\n\n'

    def chunk(self, c: Completion, i: int) -> bytes:
        return b"".join((self._prefix(c), b'{"content":"', c.pieces[i], b'"},"finish_reason":null}],"usage":null}\n\n'))

    def tail(self, c: Completion) -> bytes:
        usage = _openai_usage(c) if c.usage else b"null"
        return b"".join((
            self._prefix(c), b'{},"finish_reason":"', self._finish(c), b'"}],"usage":', usage, b"}\n\ndata: [DONE]\n\n",
        ))  # fmt: skip

    def body(self, c: Completion) -> bytes:
        usage = b',"usage":' + _openai_usage(c) if c.usage else b""
        return b"".join((
            b'{"id":"chatcmpl-', c.id, b'","object":"chat.completion","created":%d,"model":' % c.created, c.model,
            b',"choices":[{"index":0,"message":{"role":"assistant","content":"', b"".join(c.pieces),
            b'"},"finish_reason":"', self._finish(c), b'"}]', usage, b"}",
        ))  # fmt: skip


class FireworksCompletions(_OpenAIStyle):
    """``POST /inference/v1/completions``: text in ``choices[0].text``."""


    def read(self, body: dict[str, Any], args: tuple[str, ...], request: tornado.httputil.HTTPServerRequest) -> Request:
        request_info = super().read(body, args, request)
        request_info.prompt_tokens = count_words(body.get("prompt"))
        return request_info

    def _prefix(self, c: Completion) -> bytes:
        return b"".join((
            b'data: {"id":"cmpl-', c.id, b'","object":"text_completion","created":%d,"model":' % c.created,
            c.model, b',"choices":[{"index":0,"text":"',
        ))  # fmt: skip

    def chunk(self, c: Completion, i: int) -> bytes:
        return self._prefix(c) + c.pieces[i] + b'","logprobs":null,"finish_reason":null}],"usage":null}\n\n'

    def tail(self, c: Completion) -> bytes:
        usage = _openai_usage(c) if c.usage else b"null"
        return b"".join((
            self._prefix(c), b'","logprobs":null,"finish_reason":"', self._finish(c), b'"}],"usage":', usage,
            b"}\n\ndata: [DONE]\n\n",
        ))  # fmt: skip

    def body(self, c: Completion) -> bytes:
        usage = b',"usage":' + _openai_usage(c) if c.usage else b""
        return b"".join((
            b'{"id":"cmpl-', c.id, b'","object":"text_completion","created":%d,"model":' % c.created, c.model,
            b',"choices":[{"index":0,"text":"', b"".join(c.pieces), b'","logprobs":null,"finish_reason":"',
            self._finish(c), b'"}]', usage, b"}",
        ))  # fmt: skip


# Google Gemini ------------------------------------------------------------

_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_GOOGLE_MESSAGES = {
    429: "Resource has been exhausted (e.g. check quota).",
    500: "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
}


def _google_error(status: int) -> bytes:
    message = _GOOGLE_MESSAGES.get(status, f"fake provider error {status:d}")
    return _dumps({"error": {"code": status, "message": message, "status": _GOOGLE_STATUS.get(status, "UNKNOWN")}})


class GoogleGemini(CompletionWire):
    """``POST /v1beta/models/{model}:generateContent`` and ``:streamGenerateContent``.

    With ``alt=sse`` each chunk is ``data: {json}\\r\\n\\r\\n``; without it the
    stream is one JSON array written element by element, as Google does.
    Every chunk carries ``usageMetadata`` with the running count; the
    last content chunk carries ``finishReason`` and the final counts.
    """

    json_type = "application/json; charset=UTF-8"
    stream_type = "text/event-stream"
    server = "scaffolding on HTTPServer2"

    def error_body(self, status: int) -> bytes:
        return _google_error(status)

    def read(self, body: dict[str, Any], args: tuple[str, ...], request: tornado.httputil.HTTPServerRequest) -> Request:
        model, action = args
        config = body.get("generationConfig")
        max_tokens = _int_or_none(config.get("maxOutputTokens")) if isinstance(config, dict) else None
        contents = body.get("contents")
        return Request(
            stream=action == "streamGenerateContent",
            model=model,
            prompt_tokens=count_words(body.get("systemInstruction")) + count_words(contents if isinstance(contents, list) else None),
            max_tokens=max_tokens,
            sse=request.query_arguments.get("alt", [b""])[-1] == b"sse",
        )

    def _candidate(self, c: Completion, text: bytes, produced: int, final: bool) -> bytes:
        finish = (b',"finishReason":"MAX_TOKENS"' if c.hit_max else b',"finishReason":"STOP"') if final else b""
        thoughts = c.reasoning_tokens or 0
        extra_usage = b""
        if c.reasoning_tokens is not None:
            extra_usage += b',"thoughtsTokenCount":%d' % c.reasoning_tokens
        if c.cache_read is not None:
            extra_usage += b',"cachedContentTokenCount":%d' % c.cache_read
        usage = (
            b',"usageMetadata":{"promptTokenCount":%d,"candidatesTokenCount":%d,"totalTokenCount":%d%s}'
            % (c.input_tokens, produced, c.input_tokens + produced + thoughts, extra_usage)
            if c.usage
            else b""
        )
        call = b""
        if c.tool and final:
            call = b',{"functionCall":{"name":%s,"args":%s}}' % (_dumps(c.tool), _TOOL_INPUT_JSON.encode())
        return b"".join((
            b'{"candidates":[{"content":{"parts":[{"text":"', text, b'"}', call, b'],"role":"model"}', finish,
            b',"index":0}]', usage, b',"modelVersion":', c.model, b"}",
        ))  # fmt: skip

    def _frame(self, c: Completion, element: bytes, first: bool) -> bytes:
        if c.sse:
            return b"data: " + element + b"\r\n\r\n"
        return element if first else b",\r\n" + element

    def head(self, c: Completion) -> bytes:
        return b"" if c.sse else b"["

    def chunk(self, c: Completion, i: int) -> bytes:
        return self._frame(c, self._candidate(c, c.pieces[i], i + 1, i == c.tokens - 1), i == 0)

    def tail(self, c: Completion) -> bytes:
        end = b"" if c.sse else b"]"
        if c.tokens:
            return end
        return self._frame(c, self._candidate(c, b"", 0, True), True) + end

    def stream_error(self, c: Completion, status: int, sent: int) -> bytes:
        return self._frame(c, _google_error(status), sent == 0) + (b"" if c.sse else b"]")

    def body(self, c: Completion) -> bytes:
        return self._candidate(c, b"".join(c.pieces), c.tokens, True)


# Embeddings ---------------------------------------------------------------


class OpenAIEmbeddings(Wire):
    """``POST /v1/embeddings``."""

    def error_body(self, status: int) -> bytes:
        return _openai_error(status)

    def headers(self, request_id: str) -> Iterable[tuple[str, str]]:
        return (("x-request-id", "req_" + request_id),)

    def render(self, body: dict[str, Any], usage: bool) -> bytes:
        model = str(body.get("model") or "")
        inputs = body.get("input")
        # A string, a list of strings, a token list, or a list of token lists.
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        elif not isinstance(inputs, list):
            inputs = []
        dims = embedding_dimensions(model)
        requested = _int_or_none(body.get("dimensions"))
        if requested is not None and not model.endswith("ada-002"):
            dims = requested
        as_base64 = body.get("encoding_format") == "base64"
        parts = [b'{"object":"list","data":[']
        for index, item in enumerate(inputs):
            text, raw = _vector(_seed(item), dims)
            vector = b'"' + base64.b64encode(raw) + b'"' if as_base64 else b"[" + text + b"]"
            if index:
                parts.append(b",")
            parts += [b'{"object":"embedding","index":%d,"embedding":' % index, vector, b"}"]
        parts += [b'],"model":', _dumps(model)]
        if usage:
            tokens = count_words(inputs)
            parts.append(b',"usage":{"prompt_tokens":%d,"total_tokens":%d}' % (tokens, tokens))
        parts.append(b"}")
        return b"".join(parts)


class KServeInfer(Wire):
    """``POST /v2/models/{name}/infer`` (KServe v2, Sourcegraph embeddings)."""

    server = "uvicorn"

    def error_body(self, status: int) -> bytes:
        return _dumps({"error": f"fake provider error {status:d}"})

    def render(self, body: dict[str, Any], name: str) -> bytes:
        texts: list[Any] = []
        inputs = body.get("inputs")
        if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict):
            data = inputs[0].get("data")
            if isinstance(data, list):
                texts = data
        vectors = b",".join(_vector(_seed(text), _KSERVE_DIMENSIONS)[0] for text in texts)
        return b"".join((
            b'{"model_name":', _dumps(name), b',"model_version":"1","id":', _dumps(str(body.get("id") or "")),
            b',"parameters":{},"outputs":[{"name":"embeddings","shape":[%d,%d],"datatype":"FP32","data":['
            % (len(texts), _KSERVE_DIMENSIONS),
            vectors, b"]}]}",
        ))  # fmt: skip


# --------------------------------------------------------------------------
# Handlers


@dataclass(slots=True)
class Faults:
    """The faults one request gets, after ``fail_times`` gating."""

    status: int | None = None  # answer with this error instead of content
    cut_after: int | None = None  # stop after N content chunks (or body bytes)
    cut_kind: str = ""  # "disconnect", "stall" or "error"
    error_status: int | None = None  # type of the in-band error
    malformed: bool = False


_CUTS = (("disconnect_after", "disconnect"), ("stall_after", "stall"), ("error_after", "error"))


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _FakeHandler(tornado.web.RequestHandler):
    """Directive parsing, the request log, ttft, and fault delivery."""

    def initialize(self, state: FakeState, wire: Wire) -> None:
        self._state = state
        self._wire = wire
        self._gone = False
        self._waiter: asyncio.Future[None] | None = None
        self._opts: dict[str, Any] = {}
        self._request_id = ""

    def on_connection_close(self) -> None:
        self._gone = True
        if self._waiter is not None:
            _resolve(self._waiter)

    async def post(self, *args: str) -> None:
        state = self._state
        state.begin()
        try:
            await self._serve(args)
        except tornado.iostream.StreamClosedError:
            self._gone = True
        finally:
            state.end(self._gone)

    async def _serve(self, args: tuple[str, ...]) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        raw = self.request.body
        opts = self._options(raw)
        self._opts = opts
        self._request_id = self._state.next_id()
        body: Any
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self._record(body if body is not None else raw.decode("utf-8", "replace"))
        ready = start + opts["ttft_ms"] / 1000.0
        if not isinstance(body, dict):
            if await self._pause_until(ready):
                self._send(400, self._wire.error_body(400), self._wire.json_type, Faults())
            return
        await self._respond(body, args, opts, ready)

    async def _respond(self, body: dict[str, Any], args: tuple[str, ...], opts: dict[str, Any], ready: float) -> None:
        raise NotImplementedError

    def _options(self, raw: bytes) -> dict[str, Any]:
        opts = dict(self._state.defaults)
        for name, value in self.request.headers.get_all():
            lowered = name.lower()
            if lowered.startswith(_HEADER_PREFIX):
                _apply_directive(opts, lowered[len(_HEADER_PREFIX) :].replace("-", "_"), value)
        if b"fake:" in raw:
            for match in _DIRECTIVE_RE.finditer(raw):
                _apply_directive(opts, match.group(1).decode(), unquote(match.group(2).decode()))
        return opts

    def _record(self, body: Any) -> None:
        request = self.request
        self._state.requests.append({
            "method": request.method,
            "path": request.path,
            "query": {k: v[-1].decode("utf-8", "replace") for k, v in request.query_arguments.items()},
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": body,
            "ts": time.time(),
        })  # fmt: skip

    def _faults(self, opts: dict[str, Any], stream: bool) -> Faults:
        fail_times = opts.get("fail_times")
        if fail_times is not None and self._state.count_attempt(opts.get("fail_key", "")) > fail_times:
            return Faults()
        faults = Faults(malformed=opts.get("malformed", False))
        status = opts.get("status")
        if status is not None and status < 300:
            status = None
        for name, kind in _CUTS:
            after = opts.get(name)
            if after is None or (kind == "error" and not stream):
                continue
            if faults.cut_after is None or after < faults.cut_after:
                faults.cut_after, faults.cut_kind = after, kind
        if faults.cut_after is not None:
            faults.error_status = status
        elif status is not None:
            faults.status = status
        elif fail_times is not None and not faults.malformed:
            faults.status = 500
        return faults

    async def _pause_until(self, when: float) -> bool:
        """Waits until loop time ``when`` or until the client leaves; False if it left."""
        loop = asyncio.get_running_loop()
        if not self._gone and when > loop.time():
            waiter = loop.create_future()
            handle = loop.call_at(when, _resolve, waiter)
            self._waiter = waiter
            try:
                await waiter
            finally:
                handle.cancel()
                self._waiter = None
        return not self._gone

    async def _flush(self) -> bool:
        try:
            await self.flush()
        except tornado.iostream.StreamClosedError:
            self._gone = True
        return not self._gone

    def _drop(self) -> None:
        """Closes the TCP connection without finishing the response."""
        self.detach().close()

    def _start_response(self, status: int, content_type: str) -> None:
        self.set_status(status, "Overloaded" if status == 529 else None)
        self.set_header("Content-Type", self._opts.get("content_type", content_type))
        self.set_header("Server", self._wire.server)
        for name, value in self._wire.headers(self._request_id):
            self.set_header(name, value)

    def _send_error(self, status: int) -> None:
        retry_after = self._opts.get("retry_after")
        if retry_after is not None:
            self.set_header("Retry-After", retry_after)
        self._send(status, self._wire.error_body(status), self._wire.json_type, Faults(malformed=self._opts.get("malformed", False)))

    def _send(self, status: int, payload: bytes, content_type: str, faults: Faults) -> None:
        self._start_response(status, content_type)
        if faults.malformed:
            payload = payload[: len(payload) // 2]
        self.finish(payload)

    async def _send_cut(self, status: int, payload: bytes, content_type: str, faults: Faults) -> None:
        """A non-streamed body cut after ``cut_after`` bytes, then dropped or stalled."""
        assert faults.cut_after is not None
        self._start_response(status, content_type)
        self.set_header("Content-Length", str(len(payload)))
        self.write(payload[: faults.cut_after])
        if not await self._flush():
            return
        if faults.cut_kind == "stall" and not await self._pause_until(asyncio.get_running_loop().time() + self._state.stall_cap_s):
            return
        self._drop()


def _mangle(event: bytes) -> bytes:
    """Cuts the JSON of an event's data line in half, keeping the framing."""
    start = event.find(b"data: ")
    if start < 0:
        return event[: len(event) // 2]
    start += 6
    end = event.find(b"\n", start)
    if end < 0:
        end = len(event)
    if event[end - 1 : end] == b"\r":
        end -= 1
    return event[: start + (end - start) // 2] + event[end:]


class CompletionHandler(_FakeHandler):
    """Any completions route; the wire format decides the shapes."""

    _wire: CompletionWire

    async def _respond(self, body: dict[str, Any], args: tuple[str, ...], opts: dict[str, Any], ready: float) -> None:
        wire = self._wire
        request = wire.read(body, args, self.request)
        faults = self._faults(opts, request.stream)
        tokens: int = opts["tokens"]
        pieces = _pieces(tokens)
        if pieces and opts.get("huge_event_bytes"):
            pieces[0] = b"x" * opts["huge_event_bytes"]
        if pieces and opts.get("invalid_utf8"):
            pieces[0] = pieces[0] + b"\xff\xfe"
        completion = Completion(
            id=self._request_id.encode(),
            model=_dumps(request.model),
            created=int(time.time()),
            input_tokens=opts.get("input_tokens", request.prompt_tokens),
            tokens=tokens,
            pieces=pieces,
            usage=not opts.get("no_usage", False),
            include_usage=request.include_usage,
            hit_max=request.max_tokens is not None and tokens >= request.max_tokens,
            cumulative=request.cumulative,
            sse=request.sse,
            tool=opts.get("tool_use"),
            thinking=opts.get("thinking", False),
            cache_read=opts.get("cache_read"),
            cache_creation=opts.get("cache_creation"),
            reasoning_tokens=opts.get("reasoning_tokens"),
        )
        if not await self._pause_until(ready):
            return
        if faults.status is not None:
            self._send_error(faults.status)
            return
        if request.stream:
            await self._stream(completion, faults, opts["tokens_per_s"], ready)
            return
        rate = opts["tokens_per_s"]
        if rate > 0 and tokens > 1 and not await self._pause_until(ready + (tokens - 1) / rate):
            return
        if faults.cut_after is not None:
            await self._send_cut(200, wire.body(completion), wire.json_type, faults)
        else:
            self._send(200, wire.body(completion), wire.json_type, faults)

    async def _stream(self, c: Completion, faults: Faults, rate: float, ready: float) -> None:
        wire = self._wire
        self._start_response(200, wire.stream_type if c.sse else wire.json_type)
        self.set_header("Cache-Control", "no-cache")
        self.write(wire.head(c))
        cut = faults.cut_after
        count = c.tokens if cut is None else min(cut, c.tokens)
        paced = rate > 0
        for i in range(count):
            # Targets are absolute so sleeping late never accumulates drift.
            if paced and i and not await self._pause_until(ready + i / rate):
                return
            event = wire.chunk(c, i)
            self.write(_mangle(event) if faults.malformed and i == 0 else event)
            if paced and not await self._flush():
                return
        if cut is None:
            self.write(wire.tail(c))
            # Flushing before finish() keeps the response chunked, as real
            # streams are, instead of letting Tornado add a Content-Length.
            if await self._flush():
                self.finish()
            return
        if faults.cut_kind == "error":
            self.write(wire.stream_error(c, faults.error_status or wire.default_stream_error, count))
            if await self._flush():
                self.finish()
            return
        if not await self._flush():
            return
        if faults.cut_kind == "stall":
            loop = asyncio.get_running_loop()
            if not await self._pause_until(loop.time() + self._state.stall_cap_s):
                return
        self._drop()


class EmbeddingsHandler(_FakeHandler):
    """``POST /v1/embeddings``."""

    _wire: OpenAIEmbeddings

    async def _respond(self, body: dict[str, Any], args: tuple[str, ...], opts: dict[str, Any], ready: float) -> None:
        await self._answer(self._wire.render(body, not opts.get("no_usage", False)), opts, ready)

    async def _answer(self, payload: bytes, opts: dict[str, Any], ready: float) -> None:
        faults = self._faults(opts, stream=False)
        if not await self._pause_until(ready):
            return
        if faults.status is not None:
            self._send_error(faults.status)
        elif faults.cut_after is not None:
            await self._send_cut(200, payload, self._wire.json_type, faults)
        else:
            self._send(200, payload, self._wire.json_type, faults)


class CountTokensHandler(EmbeddingsHandler):
    """``POST /v1/messages/count_tokens``."""

    _wire: AnthropicCountTokens  # type: ignore[assignment]

    async def _respond(self, body: dict[str, Any], args: tuple[str, ...], opts: dict[str, Any], ready: float) -> None:
        await self._answer(self._wire.render(body), opts, ready)


class KServeHandler(EmbeddingsHandler):
    """``POST /v2/models/{name}/infer``."""

    _wire: KServeInfer  # type: ignore[assignment]

    async def _respond(self, body: dict[str, Any], args: tuple[str, ...], opts: dict[str, Any], ready: float) -> None:
        await self._answer(self._wire.render(body, args[0]), opts, ready)


class _ControlHandler(tornado.web.RequestHandler):
    def initialize(self, state: FakeState) -> None:
        self._state = state

    def _json(self, value: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(value))


class StatsHandler(_ControlHandler):
    def get(self) -> None:
        self._json(self._state.stats())


class ResetHandler(_ControlHandler):
    def post(self) -> None:
        self._state.reset()
        self._json(self._state.stats())


class RequestsHandler(_ControlHandler):
    def get(self) -> None:
        self._json(list(self._state.requests))


class NotFoundHandler(tornado.web.RequestHandler):
    def prepare(self) -> None:
        self.set_status(404)
        self.set_header("Content-Type", "application/json")
        self.finish(b'{"error":{"message":"fake provider: no such route","type":"not_found_error"}}')


def _no_access_log(handler: tornado.web.RequestHandler) -> None:
    pass


def make_app(**defaults: Any) -> tornado.web.Application:
    """The fake provider as a Tornado Application.

    Keyword arguments are server-wide defaults for any directive name
    (``ttft_ms=0, tokens=20, tokens_per_s=0`` unless given), plus
    ``request_log_size`` (default 1000) and ``stall_cap_s`` (default 300).
    Per-request headers and body directives override them.
    """
    directive_defaults = dict(_BASE_DEFAULTS)
    server: dict[str, Any] = {"request_log_size": _DEFAULT_REQUEST_LOG_SIZE, "stall_cap_s": _DEFAULT_STALL_CAP_S}
    for name, value in defaults.items():
        parse = DIRECTIVES.get(name) or _SERVER_OPTIONS.get(name)
        if parse is None:
            raise TypeError(f"unknown fake provider option {name!r}")
        (server if name in _SERVER_OPTIONS else directive_defaults)[name] = parse(value)
    state = FakeState(directive_defaults, server["request_log_size"], server["stall_cap_s"])

    def route(pattern: str, handler: type[tornado.web.RequestHandler], wire: Wire) -> tuple[str, Any, dict[str, Any]]:
        return (pattern, handler, {"state": state, "wire": wire})

    handlers: list[Any] = [
        route(r"/v1/messages", CompletionHandler, AnthropicMessages()),
        route(r"/v1/messages/count_tokens", CountTokensHandler, AnthropicCountTokens()),
        route(r"/v1/complete", CompletionHandler, AnthropicComplete()),
        route(r"/v1/chat/completions", CompletionHandler, OpenAIChat()),
        route(r"/v1/embeddings", EmbeddingsHandler, OpenAIEmbeddings()),
        route(r"/inference/v1/chat/completions", CompletionHandler, FireworksChat()),
        route(r"/inference/v1/completions", CompletionHandler, FireworksCompletions()),
        route(r"/v1(?:beta)?/models/([^/:]+):(generateContent|streamGenerateContent)", CompletionHandler, GoogleGemini()),
        route(r"/v2/models/([^/]+)(?:/versions/[^/]+)?/infer", KServeHandler, KServeInfer()),
        (r"/_fake/stats", StatsHandler, {"state": state}),
        (r"/_fake/reset", ResetHandler, {"state": state}),
        (r"/_fake/requests", RequestsHandler, {"state": state}),
    ]
    app = tornado.web.Application(handlers, default_handler_class=NotFoundHandler, log_function=_no_access_log)
    app.settings["fake_state"] = state
    return app


class FakeProvider:
    """A running fake provider server (see :func:`start_fake_provider`)."""

    def __init__(self, app: tornado.web.Application, server: tornado.httpserver.HTTPServer, host: str, port: int) -> None:
        self.app = app
        self.server = server
        self.host = host
        self.port = port
        self.state: FakeState = app.settings["fake_state"]
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{port:d}"

    async def stop(self) -> None:
        """Stops listening and closes every open connection (ending streams)."""
        self.server.stop()
        await self.server.close_all_connections()

    def stats(self) -> dict[str, int]:
        return self.state.stats()

    def requests(self) -> list[dict[str, Any]]:
        return list(self.state.requests)

    def reset(self) -> None:
        self.state.reset()


async def start_fake_provider(host: str = "127.0.0.1", port: int = 0, **defaults: Any) -> FakeProvider:
    """Starts the fake provider on the running event loop; port 0 picks a free port."""
    app = make_app(**defaults)
    sockets = tornado.netutil.bind_sockets(port, address=host)
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    return FakeProvider(app, server, host, sockets[0].getsockname()[1])


# --------------------------------------------------------------------------
# CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fake LLM provider (see docs/fake-provider.md).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed when ready)")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first byte")
    parser.add_argument("--tokens", type=int, default=20, help="content chunks per completion")
    parser.add_argument("--tokens-per-s", type=float, default=0.0, help="chunk pacing; 0 = as fast as possible")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="server-wide default for any directive"
    )
    parser.add_argument("--request-log-size", type=int, default=_DEFAULT_REQUEST_LOG_SIZE)
    parser.add_argument("--stall-cap-s", type=float, default=_DEFAULT_STALL_CAP_S)
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    return parser.parse_args(argv)


async def _serve_forever(args: argparse.Namespace) -> None:
    defaults: dict[str, Any] = {
        "ttft_ms": args.ttft_ms,
        "tokens": args.tokens,
        "tokens_per_s": args.tokens_per_s,
        "request_log_size": args.request_log_size,
        "stall_cap_s": args.stall_cap_s,
    }
    for item in args.set:
        name, _, value = item.partition("=")
        defaults[name.strip().replace("-", "_")] = value
    provider = await start_fake_provider(args.host, args.port, **defaults)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"fake provider listening on {provider.base_url}", flush=True)
    await stop.wait()
    await provider.stop()


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(_serve_forever(args))
            return
    asyncio.run(_serve_forever(args))


if __name__ == "__main__":
    main()
