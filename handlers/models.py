"""Model listing and token counting on the SDK routes (SPEC point 13).

    GET  /anthropic/v1/models              Anthropic's shape and pagination (limit, after_id, before_id)
    GET  /anthropic/v1/models/{id}         one model, or 404
    GET  /openai/v1/models                 OpenAI's shape
    POST /anthropic/v1/messages/count_tokens   forwarded upstream, not charged to the quota

A caller sees the models it may use for ``chat_completions`` (or the feature
in ``X-Sourcegraph-Feature``): the master allowlist intersected with its own
allowlist, glob patterns expanded against the catalogue. The catalogue is
every concrete id of the default allowlists (conf/schema.json) plus the
concrete ids of the configured master list, so a pattern never lists an id
nobody named.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from actors.limits import (
    evaluate_allowed_models,
    is_model_allowed,
    is_pattern,
    prefix_bare_models,
)
from conf.loader import load_schema
from conf.model import Config
from errors import BadRequest, NotFound, UpstreamError
from handlers.admission import completion_feature, limit_for_feature
from handlers.base import BaseHandler, UpstreamHandler
from handlers.services import Services
from upstreams import transport as tp
from upstreams.anthropic_messages import AnthropicMessagesProvider
from upstreams.retry import failure_error

# What the listing says when a model's real creation date is unknown to us.
_EPOCH = "2024-01-01T00:00:00Z"
_EPOCH_S = 1704067200
MAX_PAGE = 1000
DEFAULT_PAGE = 20


@lru_cache(maxsize=1)
def _default_catalogue() -> dict[str, tuple[str, ...]]:
    providers = load_schema()["properties"]["providers"]["properties"]
    return {
        name: tuple(m for m in providers[name]["properties"]["allowed_models"]["default"] if not is_pattern(m))
        for name in ("anthropic", "openai", "fireworks", "google")
    }


def catalogue(config: Config, provider: str) -> list[str]:
    """Concrete model ids known for ``provider`` (defaults first, then the configured ones)."""
    master = getattr(config.providers, provider).allowed_models
    ids = list(_default_catalogue().get(provider, ()))
    seen = {m.lower() for m in ids}
    for model in master:
        if not is_pattern(model) and model.lower() not in seen:
            seen.add(model.lower())
            ids.append(model)
    return ids


class _ModelsBase(BaseHandler):
    route_class = "models"
    operation = "v1.models"
    accepts_api_key_header = True
    # The configured provider whose models are listed (providers.<name>).
    listed = "anthropic"

    async def prepare(self) -> None:
        self.start_span()
        await self.authenticate()

    def allowed_models(self) -> list[str]:
        """The concrete ids (without prefix) this caller may use, in catalogue order."""
        config = self.services.config
        provider = getattr(config.providers, self.listed)
        actor = self.actor
        assert actor is not None
        feature = self.record.feature = completion_feature(self.request.headers, required=False)
        rate_limit = limit_for_feature(self.services, actor, self.token, feature)
        prefix = f"{self.listed}/"
        master = tuple(prefix + m for m in provider.allowed_models)
        allowed = evaluate_allowed_models(prefix_bare_models(rate_limit.allowed_models, self.listed), master)
        return [m for m in catalogue(config, self.listed) if is_model_allowed(prefix + m, allowed)]


class AnthropicModelsHandler(_ModelsBase):
    listed = "anthropic"

    def initialize(self, services: Services, provider: AnthropicMessagesProvider, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(services, **kwargs)
        self.provider = provider

    def _info(self, model: str, cap: Any) -> dict[str, Any]:
        return {
            "type": "model",
            "id": model,
            "display_name": model,
            "created_at": _EPOCH,
            "lifecycle": "active",
            "max_tokens": cap(model),
        }

    def get(self, model_id: str | None = None) -> None:
        models = self.allowed_models()
        cap = self.provider.max_tokens_cap
        if model_id is not None:
            wanted = model_id.removeprefix("anthropic/").lower()
            for model in models:
                if model.lower() == wanted:
                    self.write_json(200, self._info(model, cap))
                    return
            raise NotFound(f"model {model_id[:200]!r} not found")
        limit = _page_limit(self.get_query_argument("limit", None))
        after = self.get_query_argument("after_id", None)
        before = self.get_query_argument("before_id", None)
        if after is not None and before is not None:
            raise BadRequest("after_id and before_id cannot be used together")
        index = {m: i for i, m in enumerate(models)}
        if after is not None:
            start = index.get(after, len(models) - 1) + 1
            page = models[start : start + limit]
            has_more = start + limit < len(models)
        elif before is not None:
            end = index.get(before, 0)
            page = models[max(0, end - limit) : end]
            has_more = end - limit > 0
        else:
            page = models[:limit]
            has_more = limit < len(models)
        self.write_json(
            200,
            {
                "data": [self._info(m, cap) for m in page],
                "has_more": has_more,
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
            },
        )


class OpenAIModelsHandler(_ModelsBase):
    listed = "openai"

    def get(self) -> None:
        models = self.allowed_models()
        data = [{"id": m, "object": "model", "created": _EPOCH_S, "owned_by": "openai"} for m in models]
        self.write_json(200, {"object": "list", "data": data})


def _page_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_PAGE
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest("limit must be an integer") from None
    if not 1 <= value <= MAX_PAGE:
        raise BadRequest(f"limit must be between 1 and {MAX_PAGE}")
    return value


class CountTokensHandler(UpstreamHandler):
    """``POST /anthropic/v1/messages/count_tokens``: authenticated and allowlist-checked
    like a message, forwarded to the provider, never charged to the quota."""

    route_class = "count_tokens"
    operation = "v1.completions.anthropicmessages.count_tokens"
    accepts_api_key_header = True

    def initialize(self, services: Services, provider: AnthropicMessagesProvider, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(services, **kwargs)
        self.provider = provider
        self.record.provider = "anthropic"

    async def post(self) -> None:
        services = self.services
        record = self.record
        actor = record.actor
        assert actor is not None
        feature = record.feature = completion_feature(self.request.headers, required=False)
        rate_limit = limit_for_feature(services, actor, self.token, feature)
        provider = self.provider
        model, request = provider.count_tokens_request(self.body(), self.request.headers)
        resolved = record.model = f"anthropic/{model}"
        allowed = evaluate_allowed_models(prefix_bare_models(rate_limit.allowed_models, "anthropic"), provider.allowed_models)
        if not is_model_allowed(resolved, allowed):
            raise BadRequest(f'model "{resolved}" is not allowed, allowed: [{", ".join(allowed)}]')
        self.resolved_model = resolved
        self.set_header("X-Cody-Resolved-Model", resolved)
        body = bytearray()
        status: list[int] = []
        limit = services.config.upstream.max_error_body_bytes

        def on_headers(code: int, _headers: Any) -> None:
            status.append(code)

        def on_chunk(chunk: bytes) -> None:
            if len(body) + len(chunk) <= limit:
                body.extend(chunk)

        attempt = await services.transport.send(
            request, timeout_s=self.upstream_timeout_s(), abort=self.abort, on_headers=on_headers, on_chunk=on_chunk
        )
        if attempt.outcome == tp.CLIENT_GONE or self.client_gone:
            return
        if attempt.outcome != tp.OK or attempt.status is None:
            raise failure_error(attempt, "anthropic", stall_s=services.config.upstream.stall_timeout_s)
        code = attempt.status
        if code == 429:
            code = 503
            self.set_header("Retry-After", str(provider.default_retry_after_s))
        if 300 <= code < 400:
            raise UpstreamError("upstream provider anthropic answered with a redirect")
        self.set_status(code)
        self.set_header("Content-Type", "application/json")
        self.finish(bytes(body))
