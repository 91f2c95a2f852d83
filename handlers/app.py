"""The route table: which handler serves which path, given what is configured."""

from __future__ import annotations

from typing import Any

import tornado.web

from handlers.base import DisabledRouteHandler, NotFoundHandler
from handlers.completions import CompletionsHandler
from handlers.diagnostics import (
    HealthHandler,
    LiveHandler,
    ReadyHandler,
    UnknownDiagnosticsHandler,
    VersionHandler,
)
from handlers.embeddings import embedding_routes
from handlers.limits import LimitsHandler, LimitsRefreshHandler
from handlers.metrics import MetricsHandler
from handlers.openapi import openapi_route
from handlers.services import Services
from upstreams.registry import completion_routes, disabled_routes

Route = tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]


def make_app(services: Services, extra_routes: list[Route] | None = None) -> tornado.web.Application:
    routes: list[Route] = [
        (r"/-/__version", VersionHandler, {}),
        (r"/-/healthz", HealthHandler, {}),
        (r"/-/readyz", ReadyHandler, {}),
        (r"/-/livez", LiveHandler, {}),
        (r"/metrics", MetricsHandler, {}),
        openapi_route(),
        (r"/v1/limits", LimitsHandler, {}),
        (r"/v1/limits/refresh", LimitsRefreshHandler, {}),
    ]
    routes += extra_routes or []
    routes += embedding_routes(services)
    routes += [
        (route.path, CompletionsHandler, {"provider": route.provider, "sdk_route": route.sdk_route})
        for route in completion_routes(services.config)
    ]
    routes += [(path, DisabledRouteHandler, {"message": message}) for path, message in disabled_routes(services.config)]
    routes.append((r"/-/.*", UnknownDiagnosticsHandler, {}))
    return tornado.web.Application(
        [(pattern, handler, {"services": services, **kwargs}) for pattern, handler, kwargs in routes],
        default_handler_class=NotFoundHandler,
        default_handler_args={"services": services},
        compress_response=False,
        log_function=lambda handler: None,
    )
