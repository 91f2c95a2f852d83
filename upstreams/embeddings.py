"""What both embeddings providers share: the model catalogue, the request and
result shapes, one buffered upstream exchange, and the error mapping.

Embeddings responses are small enough to buffer (at most a few MiB for a
full batch), so unlike completions nothing is relayed while it arrives:
each attempt is read whole, then parsed, and a failed attempt can always be
retried because the client has seen nothing yet.
"""

from __future__ import annotations

import array
import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard, TypeVar

import orjson
from tornado.httputil import HTTPHeaders

from conf.model import Config
from errors import (
    BadRequest,
    GatewayError,
    ServiceUnavailable,
    UpstreamError,
)
from upstreams import transport as tp
from upstreams.base import UpstreamRequest
from upstreams.retry import RetryPolicy, failure_error

T = TypeVar("T")

OPENAI = "openai"
SOURCEGRAPH = "sourcegraph"

# Built-in dimensions of OpenAI's embedding models (upstream names). The
# config key embeddings.openai_dimensions adds models or overrides these.
OPENAI_DIMENSIONS: Mapping[str, int] = {
    "text-embedding-ada-002": 1536,
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
}
# Models whose vector length the client may shorten with `dimensions`.
OPENAI_SHORTENABLE_PREFIX = "text-embedding-3"

SMEGA_MODEL = "sourcegraph/st-multi-qa-mpnet-base-dot-v1"
SMEGA_DIMENSIONS = 768
METADATA_MODEL = "sourcegraph/st-multi-qa-mpnet-metadata"

# The reference lists these three, in this order; newer OpenAI models follow.
REFERENCE_LISTING: tuple[str, ...] = (
    "openai/text-embedding-ada-002",
    SMEGA_MODEL,
    METADATA_MODEL,
)

# Upstream 429 means the gateway's own provider quota is exhausted, shared by
# every actor: the client is told "unavailable" (reference 5.2), and when to retry.
OVERLOADED_MESSAGE = "we're facing too much load at the moment, please retry later"
ERROR_RETRY_AFTER_S = "60"
# A whole 2048-input batch of 3072-dimension vectors as JSON text is ~130 MB;
# anything past this is not an embeddings response.
MAX_RESPONSE_BYTES = 256 << 20
ERROR_BODY_PREFIX_BYTES = 1024

@dataclass(frozen=True, slots=True)
class EmbeddingModel:
    """One model of the catalogue. ``name`` is the prefixed name clients use."""

    name: str
    provider: str
    upstream_name: str
    dimensions: int
    # Empty when the model can be served; otherwise why not (a 400 message).
    unavailable: str = ""

    @property
    def available(self) -> bool:
        return not self.unavailable


@dataclass(slots=True)
class EmbeddingsRequest:
    """A validated request, the same for both routes and both providers."""

    model: EmbeddingModel
    # Strings, or (OpenAI only) token-id lists.
    inputs: list[str] | list[list[int]]
    is_query: bool
    user: str
    # OpenAI text-embedding-3 models only: shorten the vectors.
    dimensions: int | None = None

    def character_count(self) -> int:
        return sum(len(item) for item in self.inputs if isinstance(item, str))


@dataclass(slots=True)
class EmbeddingsResult:
    vectors: list[list[float]]
    # The model as the reference reports it (OpenAI: the upstream name).
    model: str
    dimensions: int
    # Tokens charged; None when the provider reported none.
    tokens_used: int | None


@dataclass(slots=True)
class Exchange:
    """What the handler learns about the upstream side, for the usage event."""

    deadline: float
    abort: tp.AbortFlag
    attempts: int = 0
    upstream_status: int | None = None
    started_at: float | None = None
    ended_at: float | None = None

    def duration_ms(self) -> int | None:
        if self.started_at is None:
            return None
        return int(((self.ended_at or time.monotonic()) - self.started_at) * 1000)


class ClientGone(Exception):
    """The client left while the upstream call was running; nothing to answer."""


class EmbeddingsClient(Protocol):
    """One provider's client, built once at start."""

    provider: str
    label: str  # for messages: "OpenAI", "Sourcegraph"

    def validate(self, request: EmbeddingsRequest) -> None:
        """Raise BadRequest for input the provider would refuse (before any cost)."""
        ...

    def estimate_tokens(self, request: EmbeddingsRequest) -> int:
        """Tokens to reserve at admission (runs in an executor for large batches)."""
        ...

    async def embed(self, request: EmbeddingsRequest, exchange: Exchange) -> EmbeddingsResult: ...


def build_catalogue(config: Config) -> dict[str, EmbeddingModel]:
    """Every model the gateway knows, keyed by lower-cased prefixed name, in listing order."""
    openai = config.providers.openai
    smega = config.providers.sourcegraph_embeddings
    dimensions = dict(OPENAI_DIMENSIONS)
    dimensions.update(_configured_openai_dimensions(config))
    no_openai = "" if openai.access_token else "OpenAI embeddings are not configured on this gateway"
    no_smega = "" if smega.access_token else "Sourcegraph embeddings are not configured on this gateway"
    models: list[EmbeddingModel] = [
        EmbeddingModel("openai/text-embedding-ada-002", OPENAI, "text-embedding-ada-002", dimensions["text-embedding-ada-002"], no_openai),
        EmbeddingModel(SMEGA_MODEL, SOURCEGRAPH, SMEGA_MODEL.removeprefix("sourcegraph/"), SMEGA_DIMENSIONS, no_smega),
        EmbeddingModel(
            METADATA_MODEL, SOURCEGRAPH, METADATA_MODEL.removeprefix("sourcegraph/"), SMEGA_DIMENSIONS,
            f'the metadata-generation experiment is not supported by this gateway; use "{SMEGA_MODEL}"',
        ),
    ]
    for upstream_name, dims in dimensions.items():
        if upstream_name != "text-embedding-ada-002":
            models.append(EmbeddingModel(f"openai/{upstream_name}", OPENAI, upstream_name, dims, no_openai))
    return {m.name.lower(): m for m in models}


def _configured_openai_dimensions(config: Config) -> dict[str, int]:
    # embeddings.openai_dimensions ({"text-embedding-3-large": 3072, ...}) is
    # requested from the lead; until the key exists the built-in table is used.
    raw = getattr(config.embeddings, "openai_dimensions", None) or {}
    return {str(k).removeprefix("openai/"): int(v) for k, v in dict(raw).items()}


# -- one buffered exchange ------------------------------------------------------


@dataclass(slots=True)
class Reply:
    attempt: tp.Attempt
    body: bytes
    truncated: bool = False


async def post_buffered(transport: tp.Transport, request: UpstreamRequest, exchange: Exchange) -> Reply:
    """One attempt, its body read whole (up to MAX_RESPONSE_BYTES)."""
    remaining = exchange.deadline - time.monotonic()
    if remaining <= 0:
        return Reply(tp.Attempt(outcome=tp.TIMEOUT), b"")
    body = bytearray()
    state = {"truncated": False}

    def on_chunk(chunk: bytes) -> None:
        if len(body) + len(chunk) > MAX_RESPONSE_BYTES:
            state["truncated"] = True
            return
        body.extend(chunk)

    if exchange.started_at is None:
        exchange.started_at = time.monotonic()
    exchange.attempts += 1
    attempt = await transport.send(
        request, timeout_s=remaining, abort=exchange.abort, on_headers=_ignore_headers, on_chunk=on_chunk
    )
    exchange.ended_at = time.monotonic()
    if attempt.outcome == tp.OK:
        exchange.upstream_status = attempt.status
    if attempt.outcome == tp.CLIENT_GONE or exchange.abort.set_:
        raise ClientGone()
    return Reply(attempt, bytes(body), state["truncated"])


def _ignore_headers(status: int, headers: HTTPHeaders) -> None:
    """Headers arrive in the Attempt; nothing is relayed while the body is read."""


async def sleep_within(delay_s: float, exchange: Exchange) -> bool:
    """Sleep before a retry; False when that would cross the deadline or the client left."""
    if time.monotonic() + delay_s >= exchange.deadline:
        return False
    await asyncio.sleep(delay_s)
    if exchange.abort.set_:
        raise ClientGone()
    return True


async def post_with_retries(
    transport: tp.Transport, request: UpstreamRequest, exchange: Exchange, policy: RetryPolicy
) -> Reply:
    """Attempts under ``policy`` until a 200 or the policy gives up; the last reply either way."""
    attempt_no = 0
    while True:
        attempt_no += 1
        reply = await post_buffered(transport, request, exchange)
        if reply.attempt.outcome == tp.OK and reply.attempt.status == 200:
            return reply
        delay = policy.delay(reply.attempt, attempt_no)
        if delay is None or not await sleep_within(delay, exchange):
            return reply


def failure(reply: Reply, label: str, url: str, *, stall_s: float) -> GatewayError:
    """The client's answer for a final failed attempt (the reference's wording for statuses)."""
    attempt = reply.attempt
    retry = {"Retry-After": ERROR_RETRY_AFTER_S}
    if attempt.outcome != tp.OK or attempt.status is None:
        return failure_error(attempt, label, stall_s=stall_s, headers=retry)
    status = attempt.status
    text = body_prefix(reply.body)
    if status == 429:
        return ServiceUnavailable(OVERLOADED_MESSAGE, headers=retry)
    if status == 400:
        # The client's input was refused: its fault, its status, the provider's reason.
        return BadRequest(f"bad request: {text}")
    return UpstreamError(f'embeddings: POST "{url}": failed with status {status}: {text}', headers=retry)


def invalid_response(label: str, why: str) -> UpstreamError:
    return UpstreamError(
        f"invalid response from upstream provider {label}: {why}", headers={"Retry-After": ERROR_RETRY_AFTER_S}
    )


def body_prefix(body: bytes) -> str:
    return body[:ERROR_BODY_PREFIX_BYTES].decode("utf-8", "replace")


def parse_json(body: bytes, label: str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid_response(label, f"not JSON ({exc.msg})") from exc


def float_vector(value: Any) -> TypeGuard[list[float]]:
    """A list of JSON numbers. array() does the element check in C: a
    generator over every float cost more than parsing the whole body."""
    if not isinstance(value, list):
        return False
    try:
        array.array("d", value)
    except TypeError:
        return False
    return True


# Parsing a full batch takes ~100 ms of CPU: large bodies go to an executor so
# the loop keeps serving other requests meanwhile.
EXECUTOR_THRESHOLD_BYTES = 1 << 20


async def off_loop(size: int, fn: Callable[[], T]) -> T:
    if size < EXECUTOR_THRESHOLD_BYTES:
        return fn()
    return await asyncio.get_running_loop().run_in_executor(None, fn)


def texts_only(request: EmbeddingsRequest) -> Sequence[str]:
    if any(not isinstance(item, str) for item in request.inputs):
        raise BadRequest(f"model {request.model.name} takes text input only, not token ids")
    return request.inputs  # type: ignore[return-value]
