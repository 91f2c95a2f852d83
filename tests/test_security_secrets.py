"""Secrets never leave: a run over every route, then a grep of everything the gateway wrote.

Upstream keys, the diagnostics secret and client tokens must not appear in
the gateway's log, the usage events (and their spool), the exported traces,
the Sentry payloads, the metrics, or any response the clients got. The
client's Authorization / x-api-key never reaches the upstream; upstream
cookies and server identity never reach the client; tokens are kept as
hashes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes.otlp import OtlpReceiver
from fakes.processes import wait_until
from fakes.sentry import FakeSentry
from tests.test_fuzz_support import full_env, private_fake, start_full_gateway, unlimited_actor  # noqa: F401

CLIENT_TOKEN = "sgd_" + "5ec7e7" * 10 + "abcd"
SDK_TOKEN = "sgd_" + "a1b2c3d4" * 8
DIAG = "diag-SECRET-0f1e2d3c4b5a69788796"
UPSTREAM_KEYS = {
    "CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN": "sk-ant-api03-UPSTREAMSECRET-anthropic-1234567890",
    "CODY_GATEWAY_OPENAI_ACCESS_TOKEN": "sk-proj-UPSTREAMSECRET-openai-1234567890",
    "CODY_GATEWAY_FIREWORKS_ACCESS_TOKEN": "fw-UPSTREAMSECRET-fireworks-1234567890",
    "CODY_GATEWAY_GOOGLE_ACCESS_TOKEN": "AIzaUPSTREAMSECRETgoogle1234567890",
    "CODY_GATEWAY_SOURCEGRAPH_EMBEDDINGS_API_TOKEN": "smega-UPSTREAMSECRET-1234567890",
}
SECRETS = {**{k.split("_")[2].lower(): v for k, v in UPSTREAM_KEYS.items()}, "diagnostics": DIAG, "client token": CLIENT_TOKEN, "sdk token": SDK_TOKEN}


@pytest.fixture(scope="module")
def stand_ins() -> Iterator[tuple[FakeSentry, OtlpReceiver]]:
    sentry, otlp = FakeSentry(), OtlpReceiver()
    yield sentry, otlp
    sentry.stop()
    otlp.stop()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, private_fake: Any, stand_ins: tuple[FakeSentry, OtlpReceiver]) -> Iterator[dict[str, Any]]:
    """Start a gateway with every telemetry output on, drive every route, stop it; return what it produced."""
    sentry, otlp = stand_ins
    workdir = tmp_path_factory.mktemp("secrets")
    env = full_env(
        workdir,
        private_fake.base_url,
        CODY_GATEWAY_DIAGNOSTICS_SECRET=DIAG,
        CODY_GATEWAY_TELEMETRY_SENTRY_DSN=sentry.dsn,
        CODY_GATEWAY_TELEMETRY_OTLP_ENDPOINT=otlp.url,
        CODY_GATEWAY_TELEMETRY_TRACE_POLICY="all",
        CODY_GATEWAY_TELEMETRY_LOG_LEVEL="debug",
        CODY_GATEWAY_UPSTREAM_RETRY_MAX_ATTEMPTS="1",
        **UPSTREAM_KEYS,
    )
    httpx.post(private_fake.base_url + "/_fake/reset", timeout=5)
    gw = start_full_gateway(workdir, env, [unlimited_actor("secret-keeper", CLIENT_TOKEN), unlimited_actor("sdk-user", SDK_TOKEN)], name="secrets gateway")
    responses: list[httpx.Response] = []
    try:
        drive_every_route(gw.base_url, responses)
        wait_until(lambda: len(gw.events("CompletionsFinished")) >= 10, 10, what="usage events")
    finally:
        gw.stop()  # flushes events, traces and Sentry
    wait_until(lambda: otlp.bodies, 10, what="exported traces")
    upstream_requests = httpx.get(private_fake.base_url + "/_fake/requests", timeout=5).json()
    spool = b"".join(p.read_bytes() for p in (workdir / "spool").rglob("*") if p.is_file()) if (workdir / "spool").exists() else b""
    yield {
        "gateway log": gw.process.output().encode(),
        "usage events": (workdir / "events.jsonl").read_bytes() + spool,
        "traces (OTLP)": b"".join(otlp.bodies),
        "Sentry payloads": b"".join(sentry.envelopes),
        "response bodies": b"".join(r.content for r in responses),
        "response headers": "\n".join(f"{k}: {v}" for r in responses for k, v in r.headers.multi_items()).encode(),
        "_responses": responses,
        "_upstream": upstream_requests,
        "_sentry_events": sentry.events(),
    }


def drive_every_route(base: str, responses: list[httpx.Response]) -> None:
    bearer = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    chat = {**bearer, "X-Sourcegraph-Feature": "chat_completions"}
    diag = {"Authorization": f"Bearer {DIAG}"}
    messages = [{"role": "user", "content": "hello"}]

    def go(method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = httpx.request(method, base + path, timeout=20, **kwargs)
        responses.append(response)
        return response

    completions: dict[str, dict[str, Any]] = {
        "/v1/completions/anthropic-messages": {"model": "claude-3-haiku-20240307", "max_tokens": 20, "messages": messages},
        "/v1/completions/anthropic": {"model": "claude-instant-1.2", "max_tokens_to_sample": 20, "prompt": "\n\nHuman: hello\n\nAssistant:"},
        "/v1/completions/openai": {"model": "gpt-4o", "messages": messages},
        "/v1/completions/fireworks": {"model": "starcoder", "prompt": "def f():", "max_tokens": 20},
        "/v1/completions/google": {"model": "gemini-1.5-flash-latest", "contents": [{"role": "user", "parts": [{"text": "hello"}]}]},
    }
    for path, body in completions.items():
        for stream in (False, True):
            assert go("POST", path, json={**body, "stream": stream}, headers=chat).status_code == 200
        # Upstream failures take the error paths (error logs, Sentry, 503 rewrite, in-band errors).
        for directive in ("fake:status=500", "fake:status=429", "fake:status=401", "fake:disconnect_after=1"):
            failing = {**body, "stream": True}
            text = "hello " + directive
            if "messages" in failing:
                failing["messages"] = [{"role": "user", "content": text}]
            elif "contents" in failing:
                failing["contents"] = [{"role": "user", "parts": [{"text": text}]}]
            else:
                failing["prompt"] = text
            go("POST", path, json=failing, headers=chat)
    sdk = {"model": "claude-3-haiku-20240307", "max_tokens": 20, "messages": messages}
    assert go("POST", "/anthropic/v1/messages", json=sdk, headers={"x-api-key": SDK_TOKEN, "anthropic-version": "2023-06-01"}).status_code == 200
    assert go("POST", "/anthropic/v1/messages", json={**sdk, "stream": True}, headers={"Authorization": f"Bearer {SDK_TOKEN}"}).status_code == 200
    assert go("POST", "/openai/v1/chat/completions", json={"model": "gpt-4o", "messages": messages}, headers={"Authorization": f"Bearer {SDK_TOKEN}"}).status_code == 200
    assert go("POST", "/v1/embeddings", json={"model": "openai/text-embedding-3-small", "input": ["a", "b"]}, headers=bearer).status_code == 200
    assert go("POST", "/v1/embeddings", json={"model": "sourcegraph/st-multi-qa-mpnet-base-dot-v1", "input": ["a"]}, headers=bearer).status_code == 200
    assert go("POST", "/openai/v1/embeddings", json={"model": "text-embedding-3-small", "input": "a"}, headers={"Authorization": f"Bearer {SDK_TOKEN}"}).status_code == 200
    assert go("GET", "/v1/embeddings/models", headers=bearer).status_code == 200
    assert go("GET", "/v1/limits", headers=bearer).status_code == 200
    go("POST", "/v1/limits/refresh", headers=bearer)
    go("POST", "/v1/attribution", json={"snippet": "x", "limit": 1}, headers=bearer)
    for path in ("/-/healthz", "/-/actor/sync-all-sources", "/-/flagged-requests", "/-/flagged-requests/prompt:a:b:c"):
        go("GET", path, headers=diag)
        go("GET", path, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})  # a client token where the secret belongs
        go("GET", path, headers={"Authorization": f"Bearer {DIAG}x"})
    for path in ("/-/__version", "/metrics", "/openapi.json", "/-/nope", "/nope"):
        go("GET", path, headers=bearer)
    # Credentials in the wrong places: never echoed back, never logged.
    go("GET", "/v1/limits", headers={"Authorization": f"{CLIENT_TOKEN} trailing"})
    go("GET", "/v1/limits", headers={"Authorization": CLIENT_TOKEN})
    go("GET", "/v1/limits", headers={"Authorization": f"Basic {CLIENT_TOKEN}"})
    go("GET", "/v1/limits", headers={"Authorization": f"Bearer {CLIENT_TOKEN[:-1]}x"})
    go("GET", "/v1/limits", headers={"Authorization": f"Bearer {CLIENT_TOKEN}0"})
    go("POST", "/v1/completions/openai", json={"model": "gpt-4o", "messages": messages}, headers={"x-api-key": CLIENT_TOKEN, "X-Sourcegraph-Feature": "chat_completions"})
    go("GET", "/v1/completions/openai", headers=chat)
    go("POST", "/v1/completions/anthropic-messages", content=b"{not json", headers=chat)
    go("POST", "/v1/completions/anthropic-messages", json={"model": "nope", "messages": messages, "max_tokens": 5}, headers=chat)


HAYSTACKS = ["gateway log", "usage events", "traces (OTLP)", "Sentry payloads", "response bodies", "response headers"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_no_secret_in_anything_the_gateway_writes(run: dict[str, Any], haystack: str) -> None:
    data = run[haystack]
    leaks = {name: data.count(value.encode()) for name, value in SECRETS.items() if value.encode() in data}
    # Also their URL-quoted and JSON-escaped forms are the same strings here (no special characters).
    assert leaks == {}, f"{haystack} holds {leaks}"


def test_the_run_exercised_the_outputs(run: dict[str, Any]) -> None:
    """The grep above is only meaningful if every output had content."""
    for haystack in ("gateway log", "usage events", "traces (OTLP)", "response bodies"):
        assert len(run[haystack]) > 1000, haystack
    assert run["_sentry_events"], "no Sentry event: the error paths did not report"
    assert len(run["_responses"]) > 60


def test_client_credentials_are_not_forwarded_upstream(run: dict[str, Any]) -> None:
    requests = run["_upstream"]
    assert len(requests) >= 10
    for request in requests:
        headers = request["headers"]
        for name, value in headers.items():
            assert CLIENT_TOKEN not in value and SDK_TOKEN not in value, (request["path"], name)
        # The upstream gets the gateway's own key, not the client's.
        if request["path"].startswith("/v1/messages") or request["path"].startswith("/v1/complete"):
            assert headers.get("x-api-key") == UPSTREAM_KEYS["CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN"]
            assert "authorization" not in headers
        if request["path"] == "/v1/chat/completions":
            assert headers.get("authorization") == "Bearer " + UPSTREAM_KEYS["CODY_GATEWAY_OPENAI_ACCESS_TOKEN"]
            assert "x-api-key" not in headers
        # Neither are the client's trace or identity headers that only mean something to us.
        assert "x-sourcegraph-feature" not in headers


def test_upstream_identity_is_not_relayed(run: dict[str, Any]) -> None:
    for response in run["_responses"]:
        assert response.headers.get("server", "").lower() not in ("cloudflare", "scaffolding on httpserver2")


class CookieUpstream:
    """An Anthropic-shaped upstream that sets cookies and other headers no client should get."""

    HEADERS = [
        ("Set-Cookie", "session=upstream-session-cookie; Path=/; HttpOnly"),
        ("Set-Cookie", "__cf_bm=tracking; Path=/"),
        ("Set-Cookie2", "legacy=1"),
        ("Server", "upstream-server/1.0"),
        ("Proxy-Authenticate", "Basic realm=upstream"),
        ("Keep-Alive", "timeout=5"),
        ("Trailer", "X-Checksum"),
        ("Connection", "X-Upstream-Private"),
        ("X-Upstream-Private", "hop-by-hop by nomination"),
        ("request-id", "req_upstream"),
    ]

    def __init__(self) -> None:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = 200 if "error" not in self.path else 400
                body = (b'{"type":"message","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":1,"output_tokens":1}}'
                        if status == 200 else b'{"type":"error","error":{"type":"invalid_request_error","message":"no"}}')
                self.send_response(status)
                for name, value in upstream.HEADERS:
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def test_upstream_cookies_and_hop_by_hop_headers_are_not_relayed(tmp_path: Path, private_fake: Any) -> None:
    upstream = CookieUpstream()
    env = full_env(tmp_path, private_fake.base_url, CODY_GATEWAY_ANTHROPIC_API_URL=upstream.url, CODY_GATEWAY_UPSTREAM_RETRY_MAX_ATTEMPTS="1")
    gw = start_full_gateway(tmp_path, env, [unlimited_actor("cookie-eater", CLIENT_TOKEN)], name="cookie gateway")
    try:
        headers = {"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Sourcegraph-Feature": "chat_completions"}
        body = {"model": "claude-3-haiku-20240307", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        ok = httpx.post(gw.base_url + "/v1/completions/anthropic-messages", json=body, headers=headers, timeout=10)
        assert ok.status_code == 200
        assert ok.headers.get("request-id") == "req_upstream"  # ordinary upstream headers are relayed
        names = {name.lower() for name, _ in ok.headers.multi_items()}
        assert not names & {"set-cookie", "set-cookie2", "proxy-authenticate", "keep-alive", "trailer"}, names
        assert ok.headers.get("server", "") != "upstream-server/1.0"
        assert "x-upstream-private" not in names, names
    finally:
        gw.stop()
        upstream.stop()


def test_cookies_are_not_relayed_on_upstream_errors_either(tmp_path: Path, private_fake: Any) -> None:
    upstream = CookieUpstream()
    env = full_env(tmp_path, private_fake.base_url, CODY_GATEWAY_ANTHROPIC_API_URL=upstream.url + "/error", CODY_GATEWAY_UPSTREAM_RETRY_MAX_ATTEMPTS="1")
    gw = start_full_gateway(tmp_path, env, [unlimited_actor("cookie-eater", CLIENT_TOKEN)], name="cookie error gateway")
    try:
        headers = {"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Sourcegraph-Feature": "chat_completions"}
        body = {"model": "claude-3-haiku-20240307", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        failed = httpx.post(gw.base_url + "/v1/completions/anthropic-messages", json=body, headers=headers, timeout=10)
        assert failed.status_code == 400  # the upstream's own error, relayed
        names = {name.lower() for name, _ in failed.headers.multi_items()}
        assert not names & {"set-cookie", "set-cookie2", "proxy-authenticate", "keep-alive"}, names
    finally:
        gw.stop()
        upstream.stop()


def test_tokens_are_kept_as_hashes(tmp_path: Path) -> None:
    """The static source keeps SHA-256 digests, never the plain token (even when the file has one)."""
    from actors.static import parse_actors_file
    from actors.tokens import token_sha256

    by_hash = parse_actors_file(
        f'[{{"id": "a", "token": "{CLIENT_TOKEN}", "rateLimits": {{}}}}]', source="static",
        concurrency_percentage=50, concurrency_interval_s=10,
    )
    assert list(by_hash) == [token_sha256(CLIENT_TOKEN)]
    actor = by_hash[token_sha256(CLIENT_TOKEN)]
    assert CLIENT_TOKEN not in repr(vars(actor) if hasattr(actor, "__dict__") else actor)

