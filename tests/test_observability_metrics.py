"""GET /metrics through the real server: a known mix of requests, then exact counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TOKEN_A, TOKEN_B, actor, limits
from tests.support.observed_fixtures import observed_gateway  # noqa: F401  (fixture)
from tests.support.observed_gateway import InProcessGateway

MODEL = "claude-3-haiku-20240307"
ROUTE = "/v1/completions/anthropic-messages"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def post(gw: InProcessGateway, text: str, *, token: str = TOKEN_A, stream: bool = False, model: str = MODEL) -> httpx.Response:
    body = {"model": model, "max_tokens": 50, "stream": stream, "messages": [{"role": "user", "content": text}]}
    return httpx.post(
        gw.base_url + ROUTE,
        content=json.dumps(body),
        headers={"Authorization": f"Bearer {token}", "X-Sourcegraph-Feature": "chat_completions", "Content-Type": "application/json"},
        timeout=30,
    )


def scrape(gw: InProcessGateway, accept: str | None = None) -> tuple[httpx.Response, Samples]:
    response = httpx.get(gw.base_url + "/metrics", headers={"Accept": accept} if accept else {}, timeout=10)
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture
def gw(observed_gateway: Callable[..., InProcessGateway]) -> InProcessGateway:
    return observed_gateway(
        [
            actor("actor-a", TOKEN_A),
            actor("actor-b", TOKEN_B, chat_completions=limits(limit=1, interval="1h")),
        ]
    )


def test_metrics_count_a_known_mix_of_requests(gw: InProcessGateway) -> None:
    for _ in range(3):
        assert post(gw, "plain fake:tokens=7").status_code == 200
    for _ in range(2):
        assert post(gw, "streamed fake:tokens=5", stream=True).status_code == 200
    assert post(gw, "hi", token="sgd_" + "0" * 64).status_code == 401
    assert post(gw, "hi", model="not-a-real-model").status_code == 400
    assert post(gw, "first fake:tokens=3", token=TOKEN_B).status_code == 200
    assert post(gw, "second", token=TOKEN_B).status_code == 429
    assert post(gw, "boom fake:status=500").status_code == 500
    assert httpx.get(gw.base_url + "/nowhere", timeout=10).status_code == 404

    response, samples = scrape(gw)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")

    requests = "cody_gateway_http_requests_total"
    assert value(samples, requests, route="completions", provider="anthropic", code="200") == 6
    assert value(samples, requests, route="completions", provider="anthropic", code="401") == 1
    assert value(samples, requests, route="completions", provider="anthropic", code="400") == 1
    assert value(samples, requests, route="completions", provider="anthropic", code="429") == 1
    assert value(samples, requests, route="completions", provider="anthropic", code="500") == 1
    assert value(samples, requests, route="unknown", provider="", code="404") == 1
    duration = "cody_gateway_http_request_duration_seconds_count"
    assert value(samples, duration, route="completions", provider="anthropic", code_class="2xx") == 6
    assert value(samples, duration, route="completions", provider="anthropic", code_class="4xx") == 3

    # Only requests that reached the upstream have upstream figures.
    chat = {"provider": "anthropic", "feature": "chat_completions"}
    assert value(samples, "cody_gateway_latency_overhead_seconds_count", **chat, stream="false") == 5
    assert value(samples, "cody_gateway_latency_overhead_seconds_count", **chat, stream="true") == 2
    assert value(samples, "cody_gateway_upstream_request_duration_seconds_count", **chat, stream="false") == 5
    assert value(samples, "cody_gateway_time_to_first_byte_seconds_count", **chat, stream="true") == 2
    assert value(samples, "cody_gateway_time_to_first_byte_seconds_count", **chat, stream="false") == 4
    assert value(samples, "cody_gateway_upstream_responses_total", provider="anthropic", code="200") == 6
    assert value(samples, "cody_gateway_upstream_responses_total", provider="anthropic", code="500") == 1
    completions = "cody_gateway_completions_total"
    assert value(samples, completions, **chat, stream="false", outcome="complete") == 4
    assert value(samples, completions, **chat, stream="true", outcome="complete") == 2
    assert value(samples, completions, **chat, stream="false", outcome="error") == 1
    assert value(samples, "cody_gateway_stream_chunks_total", **chat) >= 6
    tokens = "cody_gateway_tokens_total"
    model = f"anthropic/{MODEL}"
    assert value(samples, tokens, provider="anthropic", model=model, feature="chat_completions", kind="output") == 3 * 7 + 2 * 5 + 3
    assert value(samples, tokens, provider="anthropic", model=model, feature="chat_completions", kind="input") > 0
    # No series ever names a model outside the allowlist.
    assert not any("not-a-real-model" in str(labels) for _, labels in samples)

    decisions = "cody_gateway_limiter_decisions_total"
    assert value(samples, decisions, feature="chat_completions", outcome="allowed") == 7
    assert value(samples, decisions, feature="chat_completions", outcome="quota") == 1
    assert value(samples, decisions, feature="code_completions", outcome="allowed") == 0  # precreated

    # Lookups: 10 completions requests; the in-process cache answers repeats.
    cache = "cody_gateway_actor_cache_lookups_total"
    assert value(samples, cache, result="hit") + value(samples, cache, result="miss") == 10
    assert value(samples, cache, result="miss") == 3

    assert value(samples, "cody_gateway_http_requests_in_flight") == 1  # the scrape itself
    assert value(samples, "cody_gateway_build_info", version="test") == 1
    assert ("cody_gateway_event_buffer_backlog", frozenset()) in samples
    assert value(samples, "cody_gateway_events_total", outcome="dropped") == 0
    # 7 CompletionsFinished (one of them the 500) and 1 RateLimited.
    assert value(samples, "cody_gateway_events_total", outcome="queued") == 8
    assert value(samples, "cody_gateway_concurrent_upstream_requests", **chat) == 0

    # The scrape itself is counted on the next one.
    _, again = scrape(gw)
    assert value(again, requests, route="metrics", provider="", code="200") == 1


def test_metrics_speak_openmetrics_when_asked(gw: InProcessGateway) -> None:
    response = httpx.get(gw.base_url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_every_metric_follows_the_naming_conventions(gw: InProcessGateway) -> None:
    text = httpx.get(gw.base_url + "/metrics", timeout=10).text
    ours = [f for f in text_string_to_metric_families(text) if f.name.startswith("cody_gateway_")]
    present = {f.name for f in ours}
    # What the issue and SPEC point 11 name, under Prometheus names.
    assert {
        "cody_gateway_http_requests", "cody_gateway_http_request_duration_seconds",
        "cody_gateway_time_to_first_byte_seconds", "cody_gateway_latency_overhead_seconds",
        "cody_gateway_concurrent_upstream_requests", "cody_gateway_stream_chunks",
        "cody_gateway_limiter_decisions", "cody_gateway_redis_command_duration_seconds", "cody_gateway_redis_errors",
        "cody_gateway_event_buffer_backlog", "cody_gateway_events", "cody_gateway_event_sink_flush_failures",
        "cody_gateway_actor_cache_lookups", "cody_gateway_circuit_breaker_open", "cody_gateway_upstream_responses",
    } <= present, present
    for family in ours:
        names = {s.name for s in family.samples}
        if family.type == "counter":
            assert names <= {family.name + "_total"}, names
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
            assert names <= {family.name + suffix for suffix in ("_bucket", "_count", "_sum")}, names
        for sample in family.samples:
            assert not {"actor", "actor_id", "identifier", "token", "trace_id"} & set(sample.labels), sample


WORKER = """
import os, sys
from telemetry.metrics import GatewayMetrics, RequestFacts
m = GatewayMetrics(version="test", providers=["anthropic"], models=["anthropic/claude-3-haiku-20240307"])
for _ in range(int(sys.argv[1])):
    m.observe_request(RequestFacts(route="completions", status=200, duration_s=0.2, provider="anthropic",
                                   feature="chat_completions", stream=True, upstream_s=0.19, upstream_status=200,
                                   ttfb_s=0.05, chunks=10, outcome="complete"))
m.upstream_started("anthropic", "chat_completions")
m.event_backlog.set(int(sys.argv[1]))
print(os.getpid())
"""

SCRAPER = """
import sys
from telemetry.metrics import GatewayMetrics, mark_worker_dead
for pid in sys.argv[1:]:
    mark_worker_dead(int(pid))
m = GatewayMetrics(version="test", providers=["anthropic"])
body, _ = m.exposition(None)
sys.stdout.write(body.decode())
"""


def run_python(code: str, *args: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def test_multiprocess_mode_aggregates_every_worker(tmp_path: Path) -> None:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    first = run_python(WORKER, "3", env=env).strip()
    second = run_python(WORKER, "4", env=env).strip()
    samples = parse(run_python(SCRAPER, env=env))
    chat = {"provider": "anthropic", "feature": "chat_completions"}
    assert value(samples, "cody_gateway_http_requests_total", route="completions", provider="anthropic", code="200") == 7
    assert value(samples, "cody_gateway_stream_chunks_total", **chat) == 70
    assert value(samples, "cody_gateway_latency_overhead_seconds_count", **chat, stream="true") == 7
    # Live gauges add up over the workers, and a dead worker's share goes away.
    assert value(samples, "cody_gateway_concurrent_upstream_requests", **chat) == 2
    assert value(samples, "cody_gateway_event_buffer_backlog") == 7
    samples = parse(run_python(SCRAPER, first, env=env))
    assert value(samples, "cody_gateway_event_buffer_backlog") == 4
    samples = parse(run_python(SCRAPER, second, env=env))
    assert value(samples, "cody_gateway_event_buffer_backlog") == 0
    assert value(samples, "cody_gateway_http_requests_total", route="completions", provider="anthropic", code="200") == 7


def test_embeddings_and_circuit_breaker_state_are_measured(gw: InProcessGateway) -> None:
    response = httpx.post(
        gw.base_url + "/v1/embeddings",
        json={"model": "openai/text-embedding-ada-002", "input": ["hello world", "second input"]},
        headers={"Authorization": f"Bearer {TOKEN_A}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    # Enough failed attempts (3 per request with retries) for the breaker to open.
    for _ in range(4):
        assert post(gw, "down fake:status=500").status_code == 500
    assert post(gw, "refused").status_code == 503
    _, samples = scrape(gw)
    emb = {"provider": "openai", "feature": "embeddings"}
    assert value(samples, "cody_gateway_http_requests_total", route="embeddings", provider="openai", code="200") == 1
    assert value(samples, "cody_gateway_upstream_responses_total", provider="openai", code="200") == 1
    assert value(samples, "cody_gateway_latency_overhead_seconds_count", **emb, stream="false") == 1
    assert value(samples, "cody_gateway_completions_total", **emb, stream="false", outcome="complete") == 1
    assert value(samples, "cody_gateway_tokens_total", provider="openai", model="openai/text-embedding-ada-002",
                 feature="embeddings", kind="input") > 0
    assert value(samples, "cody_gateway_limiter_decisions_total", feature="embeddings", outcome="allowed") == 1
    assert value(samples, "cody_gateway_circuit_breaker_open", model=f"anthropic/{MODEL}") == 1
    assert value(samples, "cody_gateway_http_requests_total", route="completions", provider="anthropic", code="503") == 1
