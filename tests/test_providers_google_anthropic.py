"""Google Gemini and Anthropic legacy completions through the real gateway, and which
routes exist for which credentials."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import TOKEN_A
from tests.providers_support import (  # noqa: F401  (fixtures)
    WiredGateway,
    assert_json_error,
    gw,
    marker,
    post,
    received,
    sse_data,
    start_module_wired,
    start_wired,
)

pytestmark = pytest.mark.timeout(90)

GOOGLE = "/v1/completions/google"
LEGACY = "/v1/completions/anthropic"


@pytest.fixture(scope="module")
def shared(start_module_wired: Any) -> WiredGateway:
    return start_module_wired()


def gemini_body(text: str, *, stream: bool, **extra: Any) -> dict[str, Any]:
    return {"model": "gemini-1.5-flash", "stream": stream, "contents": [{"role": "user", "parts": [{"text": text}]}], **extra}


def test_google_stream_uses_sse_method_and_key_in_query(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    body = gemini_body(
        f"poem {mark} fake:tokens=8",
        stream=True,
        generationConfig={"temperature": 0, "maxOutputTokens": 100, "candidateCount": 2, "seed": 5},
        safetySettings=[{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE", "extra": 1}],
        systemInstruction="Answer in verse",
        tools=[{"codeExecution": {}}],
    )
    response = post(gw, GOOGLE, body, feature="code_completions")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["X-Cody-Resolved-Model"] == "google/gemini-1.5-flash"
    text = "".join(json.loads(d)["candidates"][0]["content"]["parts"][0]["text"] for d in sse_data(response.text))
    assert len(text.split()) == 8
    sent = received(fake_provider.base_url, mark)[-1]
    assert sent["path"] == "/v1beta/models/gemini-1.5-flash:streamGenerateContent"
    assert sent["query"] == {"key": "google-upstream-secret", "alt": "sse"}
    assert "authorization" not in sent["headers"] and "x-goog-api-key" not in sent["headers"]
    assert sent["body"] == {
        "model": "gemini-1.5-flash",
        "contents": body["contents"],
        # seed and tools are forwarded since issue 15 (the reference dropped them).
        "generationConfig": {"temperature": 0, "maxOutputTokens": 100, "candidateCount": 1, "seed": 5},
        "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
        "systemInstruction": {"parts": [{"text": "Answer in verse"}]},
        "tools": [{"codeExecution": {}}],
    }  # no "stream", no unknown fields
    meta = gw.event_for(response.headers["X-Trace"])["metadata"]
    assert meta["stream"] is True and meta["completion_token_count"] == 8
    assert meta["completion_character_count"] == len(text)
    assert meta["prompt_character_count"] == len("Answer in verse\n" + body["contents"][0]["parts"][0]["text"] + "\n")
    assert meta["prompt_token_count"] == 3 + 3  # the fake counts the words of system and contents


def test_google_non_stream(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    response = post(gw, GOOGLE, gemini_body(f"{mark} fake:tokens=3", stream=False))
    assert response.status_code == 200, response.text
    assert response.json()["candidates"][0]["content"]["parts"][0]["text"] == "Hello from the"
    sent = received(fake_provider.base_url, mark)[-1]
    assert sent["path"] == "/v1beta/models/gemini-1.5-flash:generateContent"
    assert sent["query"] == {"key": "google-upstream-secret"}
    assert sent["body"]["generationConfig"] == {}
    meta = gw.event_for(response.headers["X-Trace"])["metadata"]
    assert (meta["stream"], meta["completion_token_count"], meta["prompt_token_count"]) == (False, 3, 2)


def test_google_validation(gw: WiredGateway) -> None:
    assert_json_error(post(gw, GOOGLE, gemini_body("x", stream=False, model="gemini-ultra")), 400, 'model "google/gemini-ultra" is not allowed')
    # Since issue 15 every part type is forwarded; a part must still be a non-empty object.
    assert_json_error(post(gw, GOOGLE, {"model": "gemini-pro", "contents": [{"parts": [{}]}]}), 400, "contents[0].parts[0] is empty")
    assert_json_error(post(gw, GOOGLE, {"model": "gemini-pro", "contents": [{"parts": ["text"]}]}), 400, "contents[0].parts[0]")
    assert_json_error(post(gw, GOOGLE, {"model": "gemini-pro", "generationConfig": {"topK": "many"}}), 400, "generationConfig.topK")
    # A model cannot escape its path segment.
    assert_json_error(post(gw, GOOGLE, gemini_body("x", stream=False, model="../../etc")), 400, "is not allowed")


def test_legacy_anthropic_stream(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    prompt = f"\n\nHuman: hi {mark} fake:tokens=6\n\nAssistant:"
    body = {"model": "claude-instant-1.2", "prompt": prompt, "max_tokens_to_sample": 30, "stream": True,
            "temperature": 0, "top_p": 0.95, "n": 1, "metadata": {"user_id": "spoofed"}}
    response = post(gw, LEGACY, body, feature="code_completions", headers={"X-Sourcegraph-Actor-UID": "42"})
    assert response.status_code == 200, response.text
    data = sse_data(response.text)
    assert data[-1] == "[DONE]"  # anthropic-version 2023-01-01: the cumulative shape
    completion = json.loads(data[-2])["completion"]
    assert len(completion.split()) == 6
    sent = received(fake_provider.base_url, mark)[-1]
    assert sent["path"] == "/v1/complete"
    assert sent["body"] == {
        "prompt": prompt, "model": "claude-instant-1.2", "max_tokens_to_sample": 30, "temperature": 0, "top_p": 0.95,
        "stream": True, "metadata": {"user_id": "actor-a:42"},
    }  # fmt: skip
    headers = sent["headers"]
    assert headers["x-api-key"] == "sk-ant-upstream-secret" and headers["anthropic-version"] == "2023-01-01"
    assert headers["client"] == "sourcegraph-cody-gateway/1.0" and headers["accept"] == "application/json"
    assert headers["cache-control"] == "no-cache" and "authorization" not in headers
    meta = gw.event_for(response.headers["X-Trace"])["metadata"]
    assert meta["stream"] is True and meta["max_tokens_to_sample"] == 30
    assert meta["completion_character_count"] == len(completion)
    # The legacy API reports no tokens: both counts are the tokenizer's.
    assert meta["completion_token_count"] == meta["completion_tokenizer_token_count"] > 0
    assert meta["prompt_token_count"] == meta["prompt_tokenizer_token_count"] > 0
    assert meta["prompt_character_count"] == len(prompt)


def test_legacy_anthropic_non_stream_and_validation(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    response = post(gw, LEGACY, {"model": "anthropic/claude-2", "prompt": f"\n\nHuman: {mark} fake:tokens=2\n\nAssistant:", "max_tokens_to_sample": 10})
    assert response.status_code == 200, response.text
    assert response.json()["completion"] == "Hello from"
    assert response.headers["X-Cody-Resolved-Model"] == "anthropic/claude-2"
    assert received(fake_provider.base_url, mark)[-1]["body"]["model"] == "claude-2"
    assert_json_error(post(gw, LEGACY, {"model": "claude-2", "prompt": "x", "max_tokens_to_sample": 4001}), 400,
                      "max_tokens_to_sample exceeds maximum allowed value of 4000: 4001")
    assert_json_error(post(gw, LEGACY, {"model": "claude-2", "prompt": 5}), 400, "failed to parse request body")


def test_routes_exist_only_for_providers_with_credentials(start_wired: Any) -> None:
    gw = start_wired(env={"CODY_GATEWAY_OPENAI_ACCESS_TOKEN": "", "CODY_GATEWAY_GOOGLE_ACCESS_TOKEN": ""})
    for path, provider in (("/v1/completions/openai", "openai"), ("/openai/v1/chat/completions", "openai"), ("/v1/completions/google", "google")):
        # The 404 names the disabled provider and the variable that enables it ...
        assert_json_error(post(gw, path, {"model": "x"}), 404, f"provider {provider} is disabled on this gateway: "
                          f"set CODY_GATEWAY_{provider.upper()}_ACCESS_TOKEN to enable it")  # fmt: skip
    # ... and a mistyped path keeps the plain one.
    assert_json_error(post(gw, "/v1/completions/openia", {"model": "x"}), 404, "404 page not found")
    assert post(gw, "/v1/completions/fireworks", {"model": "starcoder", "prompt": "x"}, feature="code_completions").status_code == 200
    assert post(gw, LEGACY, {"model": "claude-2", "prompt": "x", "max_tokens_to_sample": 5}).status_code == 200
    log = gw.process.output()
    for provider in ("openai", "google"):
        line = f"provider {provider} is disabled: no access token (CODY_GATEWAY_{provider.upper()}_ACCESS_TOKEN)"
        assert sum(1 for entry in log.splitlines() if line in entry and "embeddings" not in entry) == 1, log
    wrong_method = httpx.get(gw.base_url + "/v1/completions/fireworks", headers={"Authorization": f"Bearer {TOKEN_A}"}, timeout=10)
    assert_json_error(wrong_method, 405)
