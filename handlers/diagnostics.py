"""/-/ endpoints: version (open), health and maintenance (diagnostics secret)."""

from __future__ import annotations

import math
from typing import Any

from actors.tokens import constant_time_equal, parse_bearer
from errors import NotFound, RateLimited, Unauthorized
from handlers.base import BaseHandler


class VersionHandler(BaseHandler):
    route_class = "diagnostics"
    operation = "diagnostics"

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(self.services.version)

    head = get


class LiveHandler(BaseHandler):
    """``/-/livez``: answers while the event loop does; no credentials, no details."""

    route_class = "probe"
    operation = "probe"

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("ok")

    head = get


class ReadyHandler(LiveHandler):
    """``/-/readyz``: 503 until start-up completes and from the moment a drain begins,
    so a load balancer stops routing here before the open streams end."""

    def get(self) -> None:
        services = self.services
        if services.ready and not services.draining:
            super().get()
            return
        self.set_status(503)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("draining" if services.draining else "starting")

    head = get


class DiagnosticsHandler(BaseHandler):
    """Base for endpoints behind ``Authorization: Bearer <diagnostics secret>``."""

    route_class = "diagnostics"
    operation = "diagnostics"

    def prepare(self) -> None:
        self.start_span()
        throttle = self.services.guess_throttle
        address = self.record.remote_ip
        wait_s = throttle.retry_after_s(address)
        if wait_s > 0:
            raise RateLimited("too many failed attempts, retry later", headers={"Retry-After": str(math.ceil(wait_s))})
        token = parse_bearer(self.request.headers.get("Authorization"))
        secret = self.services.config.diagnostics_secret
        if not secret or not constant_time_equal(token, secret):
            throttle.failed(address)
            raise Unauthorized("unauthorized")


class HealthHandler(DiagnosticsHandler):
    async def get(self) -> None:
        report: dict[str, Any] = {"status": "ok", "version": self.services.version}
        healthy = True
        for name, probe in self.services.health_probes.items():
            try:
                detail = await probe()
            except Exception as exc:  # a probe's own failure is what health reports
                detail = {"ok": False, "error": str(exc)}
            report[name] = detail
            healthy = healthy and bool(detail.get("ok", True))
        if not healthy:
            report["status"] = "degraded"
        self.write_json(200 if healthy else 503, report)

    post = get
    head = get


class UnknownDiagnosticsHandler(BaseHandler):
    route_class = "diagnostics"

    def prepare(self) -> None:
        self.start_span()
        raise NotFound("404 page not found")
