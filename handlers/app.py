"""The route table: which handler serves which path, given what is configured."""

from __future__ import annotations

import logging
from typing import Any

import tornado.web

from handlers.base import NotFoundHandler
from handlers.completions import CompletionsHandler
from handlers.diagnostics import HealthHandler, UnknownDiagnosticsHandler, VersionHandler
from handlers.services import Services
from upstreams.anthropic_messages import AnthropicMessagesProvider

log = logging.getLogger("gateway")

Route = tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]


def completion_routes(services: Services) -> list[Route]:
    config = services.config
    routes: list[Route] = []
    anthropic = config.providers.anthropic
    if anthropic.access_token:
        messages = AnthropicMessagesProvider(anthropic, max_messages=config.server.max_messages)
        routes += [
            (r"/v1/completions/anthropic-messages", CompletionsHandler, {"provider": messages}),
            (r"/anthropic/v1/messages", CompletionsHandler, {"provider": messages, "sdk_route": True}),
        ]
    else:
        log.warning("anthropic is disabled: no access token (CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN)")
    return routes


def make_app(services: Services, extra_routes: list[Route] | None = None) -> tornado.web.Application:
    routes: list[Route] = [
        (r"/-/__version", VersionHandler, {}),
        (r"/-/healthz", HealthHandler, {}),
    ]
    routes += extra_routes or []
    routes += completion_routes(services)
    routes.append((r"/-/.*", UnknownDiagnosticsHandler, {}))
    return tornado.web.Application(
        [(pattern, handler, {"services": services, **kwargs}) for pattern, handler, kwargs in routes],
        default_handler_class=NotFoundHandler,
        default_handler_args={"services": services},
        compress_response=False,
        log_function=lambda handler: None,
    )
