"""Observability of the real ``python gateway.py`` process: /metrics, the access log on stderr,
and metrics aggregated over ``--processes 2`` workers (prometheus-client multiprocess mode)."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fakes.processes import GatewayProcess, wait_until
from tests.conftest import ANTHROPIC_KEY, TOKEN_A

MODEL = "claude-3-haiku-20240307"
ROUTE = "/v1/completions/anthropic-messages"
PROMPT = "SECRET-PROMPT-91c2 about my roadmap"

pytestmark = pytest.mark.timeout(90)


def post(gw: GatewayProcess, text: str) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 20, "stream": True, "messages": [{"role": "user", "content": text}]}
    return httpx.post(
        gw.base_url + ROUTE, content=json.dumps(body), timeout=30,
        headers={"Authorization": f"Bearer {TOKEN_A}", "X-Sourcegraph-Feature": "chat_completions", "Content-Type": "application/json"},
    )


def scrape(gw: GatewayProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(gw.base_url + "/metrics", timeout=10)
    assert response.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def ok_streams(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> float:
    key = frozenset({"route": "completions", "provider": "anthropic", "code": "200"}.items())
    return samples.get(("cody_gateway_http_requests_total", key), 0.0)


def test_the_gateway_process_serves_metrics_and_one_json_access_line_per_request(start_gateway: Callable[..., GatewayProcess]) -> None:
    gw = start_gateway()
    responses = [post(gw, PROMPT + " fake:tokens=3") for _ in range(3)]
    assert all(r.status_code == 200 for r in responses)
    assert ok_streams(scrape(gw)) == 3

    def access_lines() -> list[dict[str, Any]]:
        lines = []
        for line in gw.process.output().splitlines():
            if line.startswith("{") and '"gateway.access"' in line:
                lines.append(json.loads(line))
        return lines

    lines = wait_until(lambda: (lambda found: found if len(found) >= 4 else None)(access_lines()), what="access lines")
    completions = [line for line in lines if line["path"] == ROUTE]
    assert {line["trace_id"] for line in completions} == {r.headers["X-Trace"] for r in responses}
    for line in completions:
        assert line["status"] == 200 and line["actor_id"] == "actor-a" and line["output_tokens"] == 3
        assert line["feature"] == "chat_completions" and line["model"] == f"anthropic/{MODEL}"
    output = gw.process.output()
    for secret in ("SECRET-PROMPT-91c2", TOKEN_A, ANTHROPIC_KEY):
        assert secret not in output


def test_metrics_add_up_over_worker_processes(start_gateway: Callable[..., GatewayProcess], redis_server: Any) -> None:
    gw = start_gateway(env={"REDIS_ENDPOINT": redis_server.url}, args=["--processes", "2"])
    for _ in range(8):
        assert post(gw, "hello fake:tokens=2").status_code == 200
    # Whichever worker answers the scrape reports every worker's requests.
    for _ in range(4):
        samples = scrape(gw)
        assert ok_streams(samples) == 8
    acquires = sum(
        v for (name, labels), v in samples.items()
        if name == "cody_gateway_redis_command_duration_seconds_count" and ("command", "acquire") in labels
    )
    assert acquires == 8


def test_workers_share_the_connections(start_gateway: Callable[..., GatewayProcess], redis_server: Any) -> None:
    """Each worker accepts on its own SO_REUSEPORT socket, so a burst of connections lands on both."""
    gw = start_gateway(env={"REDIS_ENDPOINT": redis_server.url}, args=["--processes", "2"])
    connections = 40
    start = threading.Barrier(connections)

    def one_connection(_: int) -> int:
        with httpx.Client(timeout=30) as client:  # its own TCP connection
            start.wait(timeout=30)
            return client.get(gw.base_url + "/-/__version").status_code

    with ThreadPoolExecutor(connections) as pool:
        assert list(pool.map(one_connection, range(connections))) == [200] * connections

    def served_by_worker() -> Counter[int] | None:
        lines = [json.loads(line) for line in gw.process.output().splitlines() if '"gateway.access"' in line]
        found = Counter(line.get("worker") for line in lines if line.get("path") == "/-/__version")
        return found if sum(found.values()) >= connections else None

    served = wait_until(served_by_worker, what="an access line per request")
    assert set(served) == {0, 1}, served
    # 40 connections hashed over 2 sockets: fewer than 8 on one is a 1-in-50,000 event.
    assert min(served.values()) >= 8, served


def test_access_line_of_an_error_carries_its_message_scrubbed(start_gateway: Callable[..., GatewayProcess]) -> None:
    gw = start_gateway()
    # A message that quotes what the client sent: the configured secret must not survive in the log.
    bad = httpx.post(gw.base_url + ROUTE, headers={"Authorization": f"Bearer {TOKEN_A}", "X-Sourcegraph-Feature": "chat_completions"},
                     json={"model": ANTHROPIC_KEY, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, timeout=10)  # fmt: skip
    assert bad.status_code == 400

    def error_line() -> dict[str, Any] | None:
        for line in gw.process.output().splitlines():
            if '"gateway.access"' in line and '"status":400' in line:
                return dict(json.loads(line))
        return None

    line = wait_until(error_line, what="the 400's access line")
    assert "is not allowed" in line["error"], line
    assert ANTHROPIC_KEY not in gw.process.output()
