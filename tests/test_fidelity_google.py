"""Gemini at full fidelity (issue 15): function calling, thinking, inline and file data,
usage by component, through the real gateway against the fake provider."""

# The fixtures imported from tests.providers_support are parameters of the tests.

from __future__ import annotations

import json
from typing import Any

import pytest

from fakes.provider import TOOL_INPUT
from tests.providers_support import (  # noqa: F401  (fixtures)
    WiredGateway,
    gw,
    marker,
    post,
    received,
    sse_data,
    start_module_wired,
)

pytestmark = pytest.mark.timeout(120)

ROUTE = "/v1/completions/google"
MODEL = "gemini-2.5-pro"
TOOLS = [{"functionDeclarations": [{"name": "get_weather", "description": "Weather", "parameters": {"type": "OBJECT", "properties": {"location": {"type": "STRING"}}}}]}]


@pytest.fixture(scope="module")
def shared(start_module_wired: Any) -> WiredGateway:
    return start_module_wired()


def test_function_calling_round_trip(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    body: dict[str, Any] = {
        "model": MODEL,
        "contents": [{"role": "user", "parts": [{"text": f"weather? {mark} fake:tool_use=get_weather fake:tokens=2"}]}],
        "tools": TOOLS,
        "toolConfig": {"functionCallingConfig": {"mode": "AUTO"}},
    }
    response = post(gw, ROUTE, body)
    assert response.status_code == 200, response.text
    parts = response.json()["candidates"][0]["content"]["parts"]
    call = next(p["functionCall"] for p in parts if "functionCall" in p)
    assert call == {"name": "get_weather", "args": TOOL_INPUT}
    sent = received(fake_provider.base_url, mark)[-1]["body"]
    assert sent["tools"] == TOOLS and sent["toolConfig"] == body["toolConfig"]

    mark2 = marker()
    history = [
        body["contents"][0],
        {"role": "model", "parts": [{"functionCall": call, "thoughtSignature": "c2ln"}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp": 18}}}, {"text": mark2}]},
    ]
    response = post(gw, ROUTE, {"model": MODEL, "contents": history, "tools": TOOLS})
    assert response.status_code == 200, response.text
    assert received(fake_provider.base_url, mark2)[-1]["body"]["contents"] == history


def test_thinking_structured_output_and_inline_data(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    generation = {
        "maxOutputTokens": 8000,
        "thinkingConfig": {"thinkingBudget": 2048, "includeThoughts": True},
        "responseMimeType": "application/json",
        "responseSchema": {"type": "OBJECT", "properties": {"a": {"type": "STRING"}}},
    }
    parts = [
        {"text": f"describe {mark} fake:tokens=4 fake:reasoning_tokens=9 fake:cache_read=3"},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
        {"fileData": {"mimeType": "application/pdf", "fileUri": "https://generativelanguage.googleapis.com/v1beta/files/abc"}},
    ]
    response = post(gw, ROUTE, {"model": MODEL, "stream": True, "contents": [{"role": "user", "parts": parts}], "generationConfig": generation})
    assert response.status_code == 200, response.text
    sent = received(fake_provider.base_url, mark)[-1]["body"]
    assert sent["generationConfig"] == generation
    assert sent["contents"][0]["parts"] == parts
    meta = gw.event_for(response.headers["X-Trace"])["metadata"]
    assert meta["completion_token_count"] == 4 + 9  # thoughts are billed output
    assert meta["completion_reasoning_token_count"] == 9
    assert meta["prompt_cache_read_token_count"] == 3
    assert meta["prompt_cache_creation_token_count"] is None


def test_stream_cut_before_the_final_chunk_is_not_billed_the_running_count(gw: WiredGateway) -> None:
    # Each chunk carries a running usageMetadata; the client read 30 chunks, the
    # last running count it saw says 30: the count of what was relayed wins.
    response = post(gw, ROUTE, {"model": MODEL, "stream": True, "contents": [{"parts": [{"text": "x fake:tokens=60 fake:disconnect_after=30"}]}]})
    assert response.status_code == 200
    relayed = "".join(json.loads(d)["candidates"][0]["content"]["parts"][0]["text"] for d in sse_data(response.text) if d.startswith("{\"candidates"))
    meta = gw.event_for(response.headers["X-Trace"])["metadata"]
    assert meta["completion_token_count"] >= 30
    assert meta["completion_character_count"] == len(relayed)


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("contents", "where"),
    [
        ([{"parts": [{}]}], "contents[0].parts[0]"),
        ([{"parts": "text"}], "contents[0].parts"),
        ([{"parts": [{"functionCall": {"name": "f", "args": {"a": _deep(100)}}}]}], "contents[0].parts[0]"),
    ],
)
def test_malformed_parts_are_400_naming_the_path(gw: WiredGateway, contents: Any, where: str) -> None:
    response = post(gw, ROUTE, {"model": MODEL, "contents": contents})
    assert response.status_code == 400, response.text
    assert where in response.json()["error"]
