"""Embeddings: POST /v1/embeddings, GET /v1/embeddings/models, POST /openai/v1/embeddings.

The same order as completions (auth -> validate -> limit -> upstream ->
record), with the quota counted in tokens: admission reserves the offline
tokenizer's estimate of the input, and the request settles to the
provider's own count when it ends (non-2xx refunds everything). So a burst
of concurrent batches can never be admitted past the quota.
"""

from __future__ import annotations

import array
import asyncio
import base64
import dataclasses
import logging
import sys
import time
from typing import Any

import orjson

from actors.limits import evaluate_allowed_models, is_model_allowed
from actors.model import EMBEDDINGS, Actor
from errors import BadRequest, Forbidden
from handlers.admission import LimitedRequest, rate_limit_headers, rejection
from handlers.base import BaseHandler, UpstreamHandler
from handlers.services import Services
from telemetry.record import Outcome
from upstreams.decode import known_fields, opt_bool, opt_int, opt_str, parse_body
from upstreams.embeddings import (
    OPENAI,
    SOURCEGRAPH,
    ClientGone,
    EmbeddingModel,
    EmbeddingsClient,
    EmbeddingsRequest,
    EmbeddingsResult,
    Exchange,
    build_catalogue,
)
from upstreams.embeddings_openai import OpenAIEmbeddingsClient
from upstreams.embeddings_smega import SmegaEmbeddingsClient
from usage import events as ev

log = logging.getLogger("gateway.embeddings")

JSON_UTF8 = "application/json; charset=utf-8"
REFERENCE_FIELDS = ("model", "input", "isQuery")
SDK_FIELDS = ("model", "input", "encoding_format", "dimensions", "user")
# Tokenizing this many characters takes a few ms: beyond it, use an executor.
TOKENIZE_INLINE_CHARS = 64 * 1024



class Embeddings:
    """The catalogue and one client per configured provider, built once at start."""

    def __init__(self, services: Services) -> None:
        config = services.config
        self.catalogue: dict[str, EmbeddingModel] = build_catalogue(config)
        self.master_allowlist: tuple[str, ...] = config.embeddings.allowed_models
        self.clients: dict[str, EmbeddingsClient] = {}
        if config.providers.openai.access_token:
            self.clients[OPENAI] = OpenAIEmbeddingsClient(config.providers.openai, config.upstream, services.transport)
        if config.providers.sourcegraph_embeddings.access_token:
            self.clients[SOURCEGRAPH] = SmegaEmbeddingsClient(
                config.providers.sourcegraph_embeddings, services.transport, stall_s=config.upstream.stall_timeout_s
            )
        for name in self.master_allowlist:
            if name.lower() not in self.catalogue:
                log.warning("embeddings model %s is allowed but unknown (no dimensions configured): requests for it get 400", name)

    def lookup(self, model: str) -> EmbeddingModel | None:
        return self.catalogue.get(model.lower())

    def allowed_for(self, actor: Actor) -> list[str]:
        rate_limit = actor.limit_for(EMBEDDINGS)
        if rate_limit is None:
            return []
        return evaluate_allowed_models(rate_limit.allowed_models, self.master_allowlist)


# The variables that enable embeddings, for the log line and the disabled routes' 404.
EMBEDDINGS_VARIABLES = "CODY_GATEWAY_OPENAI_ACCESS_TOKEN or CODY_GATEWAY_SOURCEGRAPH_EMBEDDINGS_API_TOKEN"
EMBEDDINGS_DISABLED = f"embeddings are disabled on this gateway: set {EMBEDDINGS_VARIABLES} to enable them"


def build_embeddings(services: Services) -> Embeddings | None:
    """The embeddings catalogue and clients, or None when no embeddings provider has credentials."""
    config = services.config
    if not config.providers.openai.access_token and not config.providers.sourcegraph_embeddings.access_token:
        log.warning("embeddings are disabled: no access token (%s)", EMBEDDINGS_VARIABLES)
        return None
    embeddings = Embeddings(services)
    for provider, env in (("openai", "CODY_GATEWAY_OPENAI_ACCESS_TOKEN"), ("sourcegraph", "CODY_GATEWAY_SOURCEGRAPH_EMBEDDINGS_API_TOKEN")):
        if provider not in embeddings.clients:
            log.warning("embeddings from %s are disabled: no access token (%s)", provider, env)
    return embeddings


class EmbeddingModelsHandler(BaseHandler):
    """GET /v1/embeddings/models: every known model, ``enabled`` for this caller (reference 5.3)."""

    route_class = "embeddings_models"
    operation = "embeddings"

    def initialize(self, services: Services, embeddings: Embeddings, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(services, **kwargs)
        self.embeddings = embeddings

    async def prepare(self) -> None:
        self.start_span()
        await self.authenticate()

    def get(self) -> None:
        actor = self.actor
        assert actor is not None
        allowed = self.embeddings.allowed_for(actor) if actor.access_enabled else []
        listing = [
            {
                "name": model.name,
                "dimensions": model.dimensions,
                "enabled": bool(allowed) and model.available and model.provider in self.embeddings.clients
                and is_model_allowed(model.name, allowed),
                "deprecated": False,
            }
            for model in self.embeddings.catalogue.values()
        ]
        self.write_json(200, listing)


class EmbeddingsHandler(UpstreamHandler):
    route_class = "embeddings"
    operation = "embeddings"

    def initialize(self, services: Services, embeddings: Embeddings, sdk_route: bool = False, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(services, **kwargs)
        self.embeddings = embeddings
        self.sdk_route = sdk_route
        self.accepts_api_key_header = sdk_route
        self.limited = LimitedRequest(services)
        self.request_: EmbeddingsRequest | None = None
        self.exchange: Exchange | None = None
        self.result: EmbeddingsResult | None = None
        self.tokens_charged = 0
        self.record.feature = EMBEDDINGS
        self.record.stream = False

    # -- request ----------------------------------------------------------------

    def parse(self, actor: Actor) -> tuple[EmbeddingsRequest, EmbeddingsClient, str]:
        """Decode and check the body; returns the request, its client and the response encoding."""
        data = known_fields(parse_body(self.body()), SDK_FIELDS if self.sdk_route else REFERENCE_FIELDS)
        raw_model = opt_str(data, "model")
        if not raw_model:
            raise BadRequest("failed to parse request body: field 'model' is required")
        model_name = raw_model
        if self.sdk_route and "/" not in model_name:
            # The OpenAI SDK names OpenAI's models bare.
            model_name = f"{OPENAI}/{model_name}"
        self.record.model = model_name
        inputs = parse_input(data.get("input"))
        encoding = "float"
        dimensions: int | None = None
        is_query = False
        if self.sdk_route:
            encoding = opt_str(data, "encoding_format") or "float"
            if encoding not in ("float", "base64"):
                raise BadRequest("failed to parse request body: field 'encoding_format' must be \"float\" or \"base64\"")
            dimensions = opt_int(data, "dimensions")
            if dimensions is not None and dimensions <= 0:
                raise BadRequest("failed to parse request body: field 'dimensions' must be positive")
        else:
            is_query = bool(opt_bool(data, "isQuery"))

        allowed = self.embeddings.allowed_for(actor)
        if not is_model_allowed(model_name, allowed):
            raise BadRequest(f'model "{model_name}" is not allowed')
        model = self.embeddings.lookup(model_name)
        if model is None:
            raise BadRequest(f'model "{model_name}" not known')
        if not model.available:
            raise BadRequest(f'model "{model_name}" is not available: {model.unavailable}')
        client = self.embeddings.clients.get(model.provider)
        if client is None:
            raise BadRequest(f'model "{model_name}" is not available: its provider is not configured on this gateway')
        if dimensions is not None and dimensions > model.dimensions:
            raise BadRequest(f'dimensions {dimensions} is larger than model "{model_name}" has ({model.dimensions})')
        record = self.record
        record.model, record.provider = model.name, model.provider
        request = EmbeddingsRequest(model=model, inputs=inputs, is_query=is_query, user=actor.id, dimensions=dimensions)
        # From here on the request is one the reference would have sent to its
        # provider: it gets an EmbeddingsFinished event whatever happens next.
        self.request_ = request
        client.validate(request)
        return request, client, encoding

    async def estimate(self, client: EmbeddingsClient, request: EmbeddingsRequest) -> int:
        if request.character_count() <= TOKENIZE_INLINE_CHARS:
            return client.estimate_tokens(request)
        return await asyncio.get_running_loop().run_in_executor(None, client.estimate_tokens, request)

    async def post(self) -> None:
        record = self.record
        actor = record.actor
        assert actor is not None
        rate_limit = actor.limit_for(EMBEDDINGS)
        if rate_limit is None:
            raise Forbidden(f"no access to feature {EMBEDDINGS}")
        timeout_s = self.upstream_timeout_s()
        request, client, encoding = self.parse(actor)
        estimate = await self.estimate(client, request)
        if estimate > rate_limit.limit:
            raise BadRequest(
                f"request has {estimate} input tokens, more than the embeddings limit of {rate_limit.limit} "
                "tokens: split it into smaller batches"
            )
        rule = self.limited.make_rule(actor.id, EMBEDDINGS, rate_limit, timeout_s=timeout_s)
        # The embeddings bucket counts tokens; the token quota of completions does not apply.
        rule = dataclasses.replace(rule, tokens_limit=None)
        # At least 1: a request is admitted only while the quota is not overdrawn.
        decision = await self.services.observer.limiter(record, rule, self.limited.acquire(rule, cost=max(1, estimate)))
        if not decision.allowed:
            self.request_ = None
            self.record_rate_limited(decision, EMBEDDINGS)
            raise rejection(decision, EMBEDDINGS)
        record.decision = decision
        self.tokens_charged = max(1, estimate)
        for name, value in rate_limit_headers(decision).items():
            self.set_header(name, value)

        exchange = Exchange(deadline=time.monotonic() + timeout_s, abort=self.abort)
        self.exchange = exchange
        observer = self.services.observer
        observer.upstream_started(record)
        try:
            result = await client.embed(request, exchange)
        except ClientGone:
            record.outcome = Outcome.CLIENT_DISCONNECTED
            log.info("client disconnected from an embeddings request")
            if not self._finished:
                self.finish()
            return
        finally:
            observer.upstream_ended(record)
        self.result = result
        tokens = result.tokens_used if result.tokens_used is not None else estimate
        self.tokens_charged = tokens
        self.set_header("X-Token-Usage", str(tokens))
        self.set_header("Content-Type", JSON_UTF8)
        payload = await _render(result, request, tokens, encoding if self.sdk_route else None)
        record.outcome = Outcome.COMPLETE
        self.finish(payload)

    # -- the end -----------------------------------------------------------------

    def finalize(self) -> None:
        """Exactly once per request: settle or refund the reservation, record the event."""
        resolved = self.get_status()
        # The provider does the work (and bills it) once asked, even if the client
        # leaves before reading the result: charged from then on (SPEC point 14).
        exchange = self.exchange
        asked = exchange is not None and exchange.started_at is not None and self.record.outcome is Outcome.CLIENT_DISCONNECTED
        consumed = self.result is not None or asked
        if consumed:
            self.limited.release(refund=False, actual_cost=self.tokens_charged)
        else:
            self.limited.release(refund=True)
            self.tokens_charged = 0
        record = self.record
        request, actor = self.request_, record.actor
        if request is None or actor is None:
            return
        if exchange is not None and exchange.started_at is not None:
            record.upstream_started, record.upstream_ended = exchange.started_at, exchange.ended_at
            record.upstream_status = exchange.upstream_status
        record.input_tokens = self.tokens_charged
        outcome = record.outcome or Outcome.ERROR
        metadata: dict[str, Any] = {
            "model": request.model.name,
            "feature": EMBEDDINGS,
            "provider": request.model.provider,
            "upstream_request_duration_ms": exchange.duration_ms() if exchange else None,
            "upstream_status_code": exchange.upstream_status if exchange else None,
            "upstream_attempts": exchange.attempts if exchange else 0,
            "resolved_status_code": None if outcome is Outcome.CLIENT_DISCONNECTED and self.result is None else resolved,
            "tokens_used": self.tokens_charged,
            "batch_size": len(request.inputs),
            "input_character_count": request.character_count(),
            "is_query": request.is_query,
            "outcome": outcome.value,
            "sg_actor_id": record.actor_uid,
            "sg_actor_anonymous_uid": record.anonymous_uid,
        }
        self.record_event(ev.Event(ev.EMBEDDINGS_FINISHED, actor.source, actor.id, metadata))


def parse_input(value: Any) -> list[str] | list[list[int]]:
    """A string, a list of strings, a token list, or a list of token lists (OpenAI's shapes)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise BadRequest("failed to parse request body: field 'input' must be a string or a list of strings")
    if not value:
        raise BadRequest("input must not be empty")
    if all(isinstance(item, str) for item in value):
        return value
    if all(_is_token(item) for item in value):
        return [value]
    if all(isinstance(item, list) and all(_is_token(t) for t in item) for item in value):
        return value
    raise BadRequest("failed to parse request body: field 'input' must be a string, a list of strings or token ids")


def _is_token(item: Any) -> bool:
    return type(item) is int and item >= 0


async def _render(result: EmbeddingsResult, request: EmbeddingsRequest, tokens: int, sdk_encoding: str | None) -> bytes:
    """The reference's shape, or OpenAI's on the SDK route (float or base64 vectors)."""

    def build() -> bytes:
        if sdk_encoding is None:
            return orjson.dumps(
                {
                    "embeddings": [{"index": i, "data": v} for i, v in enumerate(result.vectors)],
                    "model": result.model,
                    "dimensions": result.dimensions,
                }
            )
        data = [
            {"object": "embedding", "index": i, "embedding": _base64(v) if sdk_encoding == "base64" else v}
            for i, v in enumerate(result.vectors)
        ]
        return orjson.dumps(
            {
                "object": "list",
                "data": data,
                "model": result.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    floats = len(result.vectors) * result.dimensions
    if floats < 100_000:
        return build()
    return await asyncio.get_running_loop().run_in_executor(None, build)


def _base64(vector: list[float]) -> str:
    """Little-endian float32, as OpenAI encodes it."""
    packed = array.array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")
