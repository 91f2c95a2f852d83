"""Usage components in metrics and spans, unknown fields and traced requests counted (issue 15, 17 item 21)."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import TOKEN_A, actor
from tests.support.observed_fixtures import observed_gateway  # noqa: F401  (fixture)
from tests.support.observed_gateway import InProcessGateway
from tests.test_observability_metrics import scrape, total, value

MODEL = "claude-3-haiku-20240307"
HEADERS = {"Authorization": f"Bearer {TOKEN_A}", "X-Sourcegraph-Feature": "chat_completions"}


def test_cache_and_reasoning_tokens_are_kinds_of_tokens_and_span_attributes(observed_gateway: Callable[..., InProcessGateway]) -> None:
    exporter = InMemorySpanExporter()
    gw = observed_gateway([actor("actor-a", TOKEN_A)], span_processors=[SimpleSpanProcessor(exporter)])
    text = "cached fake:tokens=4 fake:cache_read=30 fake:cache_creation=7"
    body = {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": text}], "unknown_new_field": 1}
    response = httpx.post(gw.base_url + "/v1/completions/anthropic-messages", content=json.dumps(body), headers=HEADERS, timeout=30)
    assert response.status_code == 200, response.text
    gw.settle()
    _, samples = scrape(gw)
    labels = {"provider": "anthropic", "model": f"anthropic/{MODEL}", "feature": "chat_completions"}
    assert value(samples, "cody_gateway_tokens_total", **labels, kind="cache_read") == 30
    assert value(samples, "cody_gateway_tokens_total", **labels, kind="cache_creation") == 7
    assert value(samples, "cody_gateway_tokens_total", **labels, kind="output") == 4
    assert total(samples, "cody_gateway_tokens_total", kind="reasoning") == 0
    assert value(samples, "cody_gateway_dropped_request_fields_total", provider="anthropic") == 1
    trace = response.headers["X-Trace"]
    spans = [s for s in exporter.get_finished_spans() if format(s.context.trace_id, "032x") == trace]
    call = next((s for s in spans if s.name == f"chat {MODEL}"), None)
    assert call is not None, [s.name for s in exporter.get_finished_spans()]
    attributes = dict(call.attributes or {})
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == 30
    assert attributes["gen_ai.usage.cache_creation.input_tokens"] == 7
    assert "gen_ai.usage.reasoning.output_tokens" not in attributes  # not reported: left out, not 0


def test_reasoning_tokens_and_traced_fireworks_requests(observed_gateway: Callable[..., InProcessGateway]) -> None:
    gw = observed_gateway([actor("actor-a", TOKEN_A)])
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "think fake:tokens=5 fake:reasoning_tokens=3"}]}
    assert httpx.post(gw.base_url + "/v1/completions/openai", json=body, headers=HEADERS, timeout=30).status_code == 200
    fireworks = {"model": "starcoder", "prompt": "def f(): fake:tokens=2"}
    genie = {**HEADERS, "X-Sourcegraph-Feature": "code_completions", "X-Fireworks-Genie": "true"}
    assert httpx.post(gw.base_url + "/v1/completions/fireworks", json=fireworks, headers=genie, timeout=30).status_code == 200
    gw.settle()
    _, samples = scrape(gw)
    assert total(samples, "cody_gateway_tokens_total", provider="openai", kind="reasoning") == 3
    assert value(samples, "cody_gateway_fireworks_traced_requests_total") == 1
