"""A served request leaves nothing for the garbage collector.

Objects that only the cyclic collector can free are paid for twice: in the
collections themselves (they were 5-7 % of a small request's CPU) and in
loop stalls (a generation-1 pass over a few hundred requests' objects took
tens of milliseconds). So every request's object graph must be freed by
reference counting when the request ends: no reference cycle may hold a
handler, its record, its upstream call or its spans.

The check: with automatic collection off, serve requests of each kind
through the real server (Redis limiter, tracing, usage events on), then run
one collection that saves what it finds and look for the gateway's own
objects in it.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import TOKEN_A, TOKEN_B, actor, limits
from tests.support.observed_fixtures import observed_gateway  # noqa: F401  (fixture)
from tests.support.observed_gateway import InProcessGateway
from tests.support.redis_servers import RedisServer
from tests.test_observability_metrics import post as metrics_post

MODEL = "claude-3-haiku-20240307"
# A request's object graph hangs from these: if one of them is in a reference
# cycle, so is everything it holds (headers, body, call, spans, futures).
REQUEST_SCOPED = (
    "tornado.web.RequestHandler",
    "tornado.httputil.HTTPServerRequest",
    "tornado.http1connection.HTTP1Connection",
    "telemetry.record.RequestRecord",
    "telemetry.spans.LeanSpan",
    "handlers.admission.LimitedRequest",
    "handlers.relay.StreamRelay",
    "upstreams.base.UpstreamRequest",
    "upstreams.transport._Exchange",
    "upstreams.transport.Attempt",
)


@pytest.fixture
def gw(observed_gateway: Callable[..., InProcessGateway], redis_server: RedisServer) -> InProcessGateway:
    actors = [
        actor("actor-a", TOKEN_A),
        # One request an hour: the second is refused (the 429 path).
        actor("actor-b", TOKEN_B, chat_completions=limits(limit=1, interval="1h")),
    ]
    return observed_gateway(
        actors,
        env={"REDIS_ENDPOINT": redis_server.url, "CODY_GATEWAY_REDIS_TIMEOUT_MS": "2000"},
        span_processors=[SimpleSpanProcessor(InMemorySpanExporter())],
    )


@pytest.fixture
def collector_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()


def post(gw: InProcessGateway, text: str, *, token: str = TOKEN_A, stream: bool = False, model: str = MODEL) -> httpx.Response:
    response = metrics_post(gw, text, token=token, stream=stream, model=model)
    gw.settle()
    return response


def request_garbage() -> dict[str, Any]:
    """Request-scoped objects (and their subclasses) that only the cyclic collector could free,
    by type, with one cycle that holds them (what to cut) under ``"cycle"``."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    found: dict[str, Any] = {}
    garbage = list(gc.garbage)
    gc.garbage.clear()
    gc.set_debug(0)
    first = None
    for obj in garbage:
        for base in type(obj).__mro__:
            if f"{base.__module__}.{base.__qualname__}" in REQUEST_SCOPED:
                name = f"{type(obj).__module__}.{type(obj).__qualname__}"
                found[name] = found.get(name, 0) + 1
                first = first or obj
                break
    if first is not None:
        found["cycle"] = cycle_holding(first, garbage)
    return found


def cycle_holding(target: object, garbage: list[object]) -> list[str]:
    """A cycle among ``garbage`` that ``target`` hangs from (what to cut), as type names."""
    members = {id(obj): obj for obj in garbage}
    # Everything in the garbage that reaches the target...
    holders = {id(target)}
    frontier = [target]
    while frontier:
        following = []
        for obj in frontier:
            for ref in gc.get_referrers(obj):
                if id(ref) in members and id(ref) not in holders:
                    holders.add(id(ref))
                    following.append(ref)
        frontier = following
    # ...and among those, the shortest way from one back to itself.
    for start_id in holders:
        start = members[start_id]
        came_from: dict[int, int | None] = {start_id: None}
        frontier = [start]
        while frontier:
            following = []
            for obj in frontier:
                for ref in gc.get_referents(obj):
                    if ref is start:
                        path = [describe(start)]
                        key: int | None = id(obj)
                        while key is not None:
                            path.append(describe(members[key]))
                            key = came_from[key]
                        return path
                    if id(ref) in holders and id(ref) not in came_from:
                        came_from[id(ref)] = id(obj)
                        following.append(ref)
            frontier = following
    return []


def describe(obj: object) -> str:
    if isinstance(obj, dict):
        return "dict(" + ",".join(map(str, list(obj)[:5])) + ")"
    name = getattr(obj, "__qualname__", None)
    return f"{type(obj).__name__} {name}" if isinstance(name, str) else type(obj).__name__


def embed(gw: InProcessGateway) -> httpx.Response:
    body = {"model": "openai/text-embedding-3-small", "input": ["one text", "another"]}
    response = httpx.post(
        gw.base_url + "/v1/embeddings",
        content=json.dumps(body),
        headers={"Authorization": f"Bearer {TOKEN_A}", "Content-Type": "application/json"},
        timeout=30,
    )
    gw.settle()
    return response


def openai_stream(gw: InProcessGateway) -> httpx.Response:
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi fake:tokens=4"}]}
    response = httpx.post(
        gw.base_url + "/v1/completions/openai",
        content=json.dumps(body),
        headers={"Authorization": f"Bearer {TOKEN_A}", "X-Sourcegraph-Feature": "chat_completions", "Content-Type": "application/json"},
        timeout=30,
    )
    gw.settle()
    return response


# Each kind of request, and the statuses it must get (so that each really takes its path).
REQUESTS: dict[str, tuple[Callable[[InProcessGateway], Any], list[int]]] = {
    "embeddings": (embed, [200]),
    "streamed OpenAI completion": (openai_stream, [200]),
    "non-streamed completion": (lambda gw: post(gw, "hello fake:tokens=5"), [200]),
    "streamed completion": (lambda gw: post(gw, "hello fake:tokens=5", stream=True), [200]),
    "model not allowed (400)": (lambda gw: post(gw, "hello", model="gpt-nonexistent"), [400]),
    "bad token (401)": (lambda gw: post(gw, "hello", token="sgd_" + "0" * 64), [401]),
    "rate limited (429)": (lambda gw: post(gw, "hello fake:tokens=3", token=TOKEN_B), [200, 429]),
    "upstream error (529 relayed)": (lambda gw: post(gw, "hello fake:status=529"), [529]),
}


def test_requests_leave_no_reference_cycles(gw: InProcessGateway, collector_paused: None) -> None:
    post(gw, "warm up fake:tokens=2")  # lazily built caches and connections are not a request's
    request_garbage()
    left: dict[str, Any] = {}
    for kind, (send, statuses) in REQUESTS.items():
        for _ in range(3):
            assert send(gw).status_code in statuses, kind
        found = request_garbage()
        if found:
            left[kind] = found
    assert left == {}, json.dumps(left, indent=1)
