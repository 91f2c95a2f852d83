"""The gateway served in-process, on its own event loop thread, for observability tests.

Built by ``composition.build_gateway``, exactly as ``gateway.serve`` builds it,
with an HTTPServer on 127.0.0.1, so tests can hand the tracer an in-memory
span exporter and read the metrics registry. Requests go over real HTTP.
"""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

with warnings.catch_warnings():
    # bpe_openai loads its vocabulary through a deprecated importlib API.
    warnings.simplefilter("ignore", DeprecationWarning)
    import upstreams.tokenizer  # noqa: F401


class InProcessGateway:
    def __init__(
        self,
        environ: Mapping[str, str],
        *,
        overrides: Mapping[str, Any] | None = None,
        span_processors: list[Any] | None = None,
        extra_routes: list[Any] | None = None,
        notify_redis_url: str | None = None,
    ) -> None:
        from conf.loader import load_config

        self.config = load_config(environ=dict(environ), overrides={"host": "127.0.0.1", "port": 0, **(overrides or {})})
        self._span_processors = span_processors or []
        self._extra_routes = extra_routes or []
        self._notify_redis_url = notify_redis_url
        self.loop = asyncio.new_event_loop()
        self._stopped = asyncio.Event()
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name="in-process gateway", daemon=True)
        self._thread.start()
        self._ready.result(timeout=30)

    # -- lifecycle --------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()

    async def _main(self) -> None:
        try:
            await self._build()
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        await self._stopped.wait()
        await self._teardown()

    async def _build(self) -> None:
        from tornado.httpclient import AsyncHTTPClient
        from tornado.httpserver import HTTPServer
        from tornado.netutil import bind_sockets

        from composition import build_gateway

        # Global to the test process: put back at teardown for the tests that follow.
        self._saved_client_config = AsyncHTTPClient._save_configuration()
        self.notify_redis = None
        if self._notify_redis_url:
            import redis.asyncio as aioredis

            self.notify_redis = aioredis.from_url(self._notify_redis_url)
        self.gateway = await build_gateway(
            self.config,
            version="test",
            span_processors=self._span_processors,
            notify_redis=self.notify_redis,
            extra_routes=self._extra_routes,
        )
        self.services = self.gateway.services
        self.http_client = self.gateway.http_client
        self.tracing = self.services.tracing
        self.events = self.services.events
        self.limiter = self.services.limiter
        self.observability = self.gateway.telemetry
        self.server = HTTPServer(self.gateway.app, decompress_request=False)
        sockets = bind_sockets(0, "127.0.0.1")
        self.server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"

    async def _teardown(self) -> None:
        from tornado.httpclient import AsyncHTTPClient

        self.server.stop()
        await self.server.close_all_connections()
        await self.gateway.close(events_timeout_s=5)
        if self.notify_redis is not None:
            await self.notify_redis.aclose()
        self.http_client.close()
        AsyncHTTPClient._restore_configuration(self._saved_client_config)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout=30)

    # -- helpers ------------------------------------------------------------------------

    def settle(self) -> None:
        """Wait until the loop has finished what it was doing.

        A response reaches the client before its handler's ``on_finish`` (span
        end, hooks) has run; that runs in the same loop callback, so one round
        trip through the loop afterwards is enough.
        """
        self.call(lambda: None)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the gateway's loop thread and return its result."""
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout=10)
