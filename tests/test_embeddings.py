"""Embeddings through the real gateway process and the fake provider (both wire formats).

Events are matched to requests by the ``X-Trace`` header.
"""

from __future__ import annotations

import array
import base64
import json
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from fakes.processes import FakeProviderProcess, GatewayProcess, wait_until, write_actors
from fakes.provider import embedding_vector
from tests.conftest import DIAGNOSTICS_SECRET, limits
from tests.support.error_shapes import error_message

with warnings.catch_warnings():
    # bpe_openai loads its vocabulary through a deprecated importlib API.
    warnings.simplefilter("ignore", DeprecationWarning)
    from upstreams.tokenizer import count_tokens

pytestmark = pytest.mark.timeout(60)

ADA = "openai/text-embedding-ada-002"
SMALL = "openai/text-embedding-3-small"
LARGE = "openai/text-embedding-3-large"
SMEGA = "sourcegraph/st-multi-qa-mpnet-base-dot-v1"
METADATA = "sourcegraph/st-multi-qa-mpnet-metadata"
OPENAI_KEY = "sk-openai-embeddings-upstream"
SMEGA_KEY = "smega-embeddings-upstream"



def token(ch: str) -> str:
    return "sgd_" + ch * 64


def actor(actor_id: str, tok: str, **rate_limits: dict[str, Any]) -> dict[str, Any]:
    return {"id": actor_id, "name": actor_id, "accessEnabled": True, "token": tok, "rateLimits": rate_limits}


MAIN = token("a")
ADA_ONLY = token("b")
NO_EMBEDDINGS = token("c")
QUOTA = token("d")
SETTLE = token("e")
SMALL_QUOTA = token("f")
QUOTA_REDIS = token("1")

ACTORS = [
    actor("emb-main", MAIN, embeddings=limits(1_000_000), chat_completions=limits()),
    actor("emb-ada-only", ADA_ONLY, embeddings=limits(1_000_000, models=[ADA])),
    actor("emb-none", NO_EMBEDDINGS, chat_completions=limits()),
    actor("emb-quota", QUOTA, embeddings=limits(100, "1h")),
    actor("emb-settle", SETTLE, embeddings=limits(100, "1h")),
    actor("emb-small-quota", SMALL_QUOTA, embeddings=limits(50, "1h")),
    actor("emb-quota-redis", QUOTA_REDIS, embeddings=limits(100, "1h")),
]


class EmbeddingsGateway(GatewayProcess):
    """A gateway process with helpers to find a request's event."""

    def event_for(self, response: httpx.Response, name: str = "EmbeddingsFinished") -> dict[str, Any]:
        trace = response.headers["X-Trace"]
        return wait_until(
            lambda: next((e for e in self.events(name) if e["metadata"].get("trace_id") == trace), None),
            what=f"{name} event of trace {trace}",
        )


def base_env(workdir: Path, fake: FakeProviderProcess) -> dict[str, str]:
    return {
        "CODY_GATEWAY_DIAGNOSTICS_SECRET": DIAGNOSTICS_SECRET,
        "CODY_GATEWAY_OPENAI_ACCESS_TOKEN": OPENAI_KEY,
        "CODY_GATEWAY_OPENAI_API_URL": fake.base_url,
        "CODY_GATEWAY_SOURCEGRAPH_EMBEDDINGS_API_TOKEN": SMEGA_KEY,
        "CODY_GATEWAY_SOURCEGRAPH_EMBEDDINGS_API_URL": fake.base_url + "/v2/models/st-multi-qa-mpnet-base-dot-v1/infer",
        "CODY_GATEWAY_EVENTS_FILE": str(workdir / "events.jsonl"),
        "CODY_GATEWAY_EVENTS_SPOOL_DIR": str(workdir / "spool"),
        "CODY_GATEWAY_EVENTS_FLUSH_INTERVAL_MS": "50",
        "CODY_GATEWAY_STATIC_ACTORS_FILE": str(workdir / "actors.json"),
        "CODY_GATEWAY_UPSTREAM_RETRY_BASE_DELAY_MS": "10",
        "CODY_GATEWAY_ALLOWED_EMBEDDINGS_MODELS": ",".join([ADA, SMALL, LARGE, SMEGA, METADATA, "openai/text-embedding-unknown"]),
    }


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory, fake_provider: FakeProviderProcess) -> Iterator[Callable[..., EmbeddingsGateway]]:
    started: list[EmbeddingsGateway] = []

    def start(env: dict[str, str] | None = None, actors: list[dict[str, Any]] | None = None) -> EmbeddingsGateway:
        workdir = tmp_path_factory.mktemp("embeddings-gw")
        full_env = {**base_env(workdir, fake_provider), **(env or {})}
        write_actors(Path(full_env["CODY_GATEWAY_STATIC_ACTORS_FILE"]), ACTORS if actors is None else actors)
        gw = EmbeddingsGateway(workdir, full_env)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture(scope="module")
def gw(launch: Callable[..., EmbeddingsGateway]) -> EmbeddingsGateway:
    return launch()


def post(gw: GatewayProcess, body: Any, *, tok: str | None = MAIN, path: str = "/v1/embeddings", timeout: float = 30) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if tok is not None:
        headers["Authorization"] = f"Bearer {tok}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(gw.base_url + path, content=content, headers=headers, timeout=timeout)


def upstream_requests(fake: FakeProviderProcess, *, user: str | None = None, path_contains: str = "") -> list[dict[str, Any]]:
    log = httpx.get(fake.base_url + "/_fake/requests", timeout=10).json()
    out = []
    for r in log:
        if path_contains not in r["path"]:
            continue
        body = r["body"] if isinstance(r["body"], dict) else {}
        if user is not None and body.get("user") != user:
            continue
        out.append(r)
    return out


def with_text(fake: FakeProviderProcess, marker: str) -> list[dict[str, Any]]:
    return [r for r in upstream_requests(fake) if marker in json.dumps(r["body"])]


def assert_error(response: httpx.Response, status: int, contains: str = "") -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = error_message(response.json(), response.request.url.path)
    assert contains in message, response.text
    return message


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-6 * max(1.0, abs(y)) for x, y in zip(a, b))


# -- the reference route ------------------------------------------------------------


def test_openai_embeddings_reference_shape(gw: EmbeddingsGateway, fake_provider: FakeProviderProcess) -> None:
    inputs = ["Pls embed ref-shape-1", "and this one too ref-shape-1"]
    response = post(gw, {"model": ADA, "input": inputs, "isQuery": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    body = response.json()
    assert set(body) == {"embeddings", "model", "dimensions"}
    assert body["model"] == "text-embedding-ada-002" and body["dimensions"] == 1536
    assert [e["index"] for e in body["embeddings"]] == [0, 1]
    for item, text in zip(body["embeddings"], inputs):
        assert set(item) == {"index", "data"}
        assert close(item["data"], embedding_vector(text, 1536))
    words = sum(len(t.split()) for t in inputs)  # the fake's token count
    assert response.headers["X-Token-Usage"] == str(words)
    assert int(response.headers["X-RateLimit-Limit"]) == 1_000_000
    assert response.headers["X-Trace"] and response.headers["X-Span"]

    sent = with_text(fake_provider, "ref-shape-1")[-1]
    assert sent["path"] == "/v1/embeddings"
    assert sent["body"] == {"model": "text-embedding-ada-002", "input": inputs, "user": "emb-main"}
    assert sent["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"

    meta = gw.event_for(response)["metadata"]
    assert meta["model"] == ADA and meta["feature"] == "embeddings" and meta["provider"] == "openai"
    assert meta["tokens_used"] == words and meta["batch_size"] == 2
    assert meta["input_character_count"] == sum(len(t) for t in inputs)
    assert meta["is_query"] is True and meta["resolved_status_code"] == 200 and meta["upstream_status_code"] == 200
    assert isinstance(meta["upstream_request_duration_ms"], int) and meta["outcome"] == "complete"


def test_smega_embeddings_kserve(gw: EmbeddingsGateway, fake_provider: FakeProviderProcess) -> None:
    inputs = ["func main() {} smega-1", "second smega-1", "third smega-1"]
    response = post(gw, {"model": SMEGA, "input": inputs, "isQuery": False})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == SMEGA and body["dimensions"] == 768
    assert [len(e["data"]) for e in body["embeddings"]] == [768, 768, 768]
    for item, text in zip(body["embeddings"], inputs):
        assert close(item["data"], embedding_vector(text, 768))
    assert response.headers["X-Token-Usage"] == "0"
    sent = with_text(fake_provider, "smega-1")[-1]
    assert sent["path"] == "/v2/models/st-multi-qa-mpnet-base-dot-v1/infer"
    assert sent["headers"]["sourcegraph-smega-inference-auth"] == SMEGA_KEY
    (tensor,) = sent["body"]["inputs"]
    assert tensor == {"name": "TEXT", "shape": [3], "datatype": "BYTES", "data": inputs}
    assert sent["body"]["id"]
    meta = gw.event_for(response)["metadata"]
    assert meta["tokens_used"] == 0 and meta["batch_size"] == 3 and meta["is_query"] is False


def test_smega_retries_then_succeeds(gw: EmbeddingsGateway, fake_provider: FakeProviderProcess) -> None:
    text = "scale down fake:status=404 fake:fail_times=2 fake:fail_key=smega-retry-ok"
    response = post(gw, {"model": SMEGA, "input": [text]})
    assert response.status_code == 200, response.text
    assert len(with_text(fake_provider, "smega-retry-ok")) == 3
    meta = gw.event_for(response)["metadata"]
    assert meta["upstream_attempts"] == 3 and meta["upstream_status_code"] == 200


def test_smega_final_failure_is_an_error_not_200_null(gw: EmbeddingsGateway, fake_provider: FakeProviderProcess) -> None:
    text = "always down fake:status=404 fake:fail_times=5 fake:fail_key=smega-retry-fail"
    response = post(gw, {"model": SMEGA, "input": [text]})
    assert_error(response, 502, "failed with status 404")
    assert response.headers["Retry-After"] == "60"
    assert "X-Token-Usage" not in response.headers
    assert len(with_text(fake_provider, "smega-retry-fail")) == 3
    meta = gw.event_for(response)["metadata"]
    assert meta["resolved_status_code"] == 502 and meta["upstream_status_code"] == 404 and meta["tokens_used"] == 0


# -- the OpenAI SDK route ---------------------------------------------------------------


def sdk(gw: GatewayProcess, tok: str = MAIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/openai/v1", api_key=tok, max_retries=0)


def test_openai_sdk_embeddings_create(gw: EmbeddingsGateway, fake_provider: FakeProviderProcess) -> None:
    inputs = ["the sdk route sdk-1", "second input sdk-1"]
    direct = openai.OpenAI(base_url=fake_provider.base_url + "/v1", api_key="x", max_retries=0)
    expected = direct.embeddings.create(model="text-embedding-3-small", input=inputs)

    # The SDK asks for base64 by default and decodes it itself.
    got = sdk(gw).embeddings.create(model="text-embedding-3-small", input=inputs)
    assert got.model == expected.model == "text-embedding-3-small"
    assert [d.index for d in got.data] == [0, 1]
    assert [d.embedding for d in got.data] == [d.embedding for d in expected.data]
    assert got.usage.prompt_tokens == got.usage.total_tokens == expected.usage.total_tokens
    sent = with_text(fake_provider, "sdk-1")[-1]
    assert sent["body"]["model"] == "text-embedding-3-small" and sent["body"]["user"] == "emb-main"

    floats = sdk(gw).embeddings.create(model="openai/text-embedding-3-large", input="one string sdk-2", encoding_format="float", dimensions=256)
    assert len(floats.data) == 1 and len(floats.data[0].embedding) == 256
    assert close(floats.data[0].embedding, embedding_vector("one string sdk-2", 256))
    assert with_text(fake_provider, "sdk-2")[-1]["body"]["dimensions"] == 256

    raw = sdk(gw).embeddings.with_raw_response.create(model=SMEGA, input=["kserve through the sdk sdk-3"], encoding_format="base64")
    assert raw.headers["X-Token-Usage"] == "0"
    body = raw.http_response.json()
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    decoded = array.array("f", base64.b64decode(body["data"][0]["embedding"])).tolist()
    assert close(decoded, embedding_vector("kserve through the sdk sdk-3", 768))


def test_openai_sdk_errors(gw: EmbeddingsGateway) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk(gw).embeddings.create(model="text-embedding-ada-002", input=["fine", ""])
    # The SDK finds our message where it looks for OpenAI's own.
    body = info.value.body
    assert isinstance(body, dict) and body["message"] == "cannot generate embeddings for an empty string"
    assert "cannot generate embeddings for an empty string" in str(info.value)
    with pytest.raises(openai.AuthenticationError):
        sdk(gw, tok="sgd_" + "9" * 64).embeddings.create(model="text-embedding-ada-002", input="x")


# -- errors ----------------------------------------------------------------------------------


def test_empty_string_is_400_before_any_upstream_call(gw: EmbeddingsGateway, fake_provider: FakeProviderProcess) -> None:
    response = post(gw, {"model": ADA, "input": ["not empty empty-1", ""]})
    assert_error(response, 400, "cannot generate embeddings for an empty string")
    assert with_text(fake_provider, "empty-1") == []
    meta = gw.event_for(response)["metadata"]
    assert meta["resolved_status_code"] == 400 and meta["tokens_used"] == 0 and meta["upstream_status_code"] is None
    assert_error(post(gw, {"model": ADA, "input": []}), 400, "input must not be empty")


def test_upstream_429_becomes_503(gw: EmbeddingsGateway, fake_provider: FakeProviderProcess) -> None:
    response = post(gw, {"model": ADA, "input": ["busy fake:status=429 upstream-429"]})
    assert_error(response, 503, "we're facing too much load at the moment, please retry later")
    assert response.headers["Retry-After"] == "60"
    # Retried per upstream.retry_max_attempts (3 by default) before giving up.
    assert len(with_text(fake_provider, "upstream-429")) == 3
    meta = gw.event_for(response)["metadata"]
    assert meta["upstream_status_code"] == 429 and meta["resolved_status_code"] == 503 and meta["tokens_used"] == 0


def test_upstream_400_passes_through(gw: EmbeddingsGateway, fake_provider: FakeProviderProcess) -> None:
    response = post(gw, {"model": ADA, "input": ["too long fake:status=400 upstream-400"]})
    message = assert_error(response, 400, "bad request: ")
    upstream_body = json.loads(message.removeprefix("bad request: "))
    assert upstream_body["error"]["code"] or upstream_body["error"]["message"]
    assert "Retry-After" not in response.headers
    assert len(with_text(fake_provider, "upstream-400")) == 1


def test_upstream_5xx_and_timeout(gw: EmbeddingsGateway) -> None:
    response = post(gw, {"model": ADA, "input": ["broken fake:status=500 upstream-500"]})
    assert_error(response, 502, "failed with status 500")
    slow = httpx.post(
        gw.base_url + "/v1/embeddings",
        json={"model": ADA, "input": ["slow fake:ttft_ms=3000 upstream-slow"]},
        headers={"Authorization": f"Bearer {MAIN}", "X-Timeout-Ms": "300"},
        timeout=30,
    )
    assert_error(slow, 504, "request to upstream provider OpenAI timed out")


def test_validation_errors(gw: EmbeddingsGateway) -> None:
    assert_error(post(gw, b"{not json"), 400, "failed to parse request body")
    assert_error(post(gw, {"model": ADA, "input": [1.5]}), 400, "failed to parse request body")
    assert_error(post(gw, {"model": ADA, "input": ["x"], "isQuery": "yes"}), 400, "failed to parse request body")
    assert_error(post(gw, {"model": "openai/text-embedding-nope", "input": ["x"]}), 400, 'model "openai/text-embedding-nope" is not allowed')
    assert_error(post(gw, {"model": "openai/text-embedding-unknown", "input": ["x"]}), 400, 'model "openai/text-embedding-unknown" not known')
    assert_error(post(gw, {"model": METADATA, "input": ["x"]}), 400, "metadata-generation experiment is not supported")
    assert_error(post(gw, {"model": SMEGA, "input": [[1, 2, 3]]}), 400, "text input only")
    assert_error(post(gw, {"model": SMALL, "input": ["x"]}, tok=ADA_ONLY), 400, f'model "{SMALL}" is not allowed')
    assert_error(post(gw, {"model": ADA, "input": ["x"]}, tok=NO_EMBEDDINGS), 403, "no access to feature embeddings")
    # No token: the anonymous actor, which has no access unless allowed.
    assert_error(post(gw, {"model": ADA, "input": ["x"]}, tok=None), 403, "access not enabled")
    response = httpx.get(gw.base_url + "/v1/embeddings", headers={"Authorization": f"Bearer {MAIN}"}, timeout=10)
    assert_error(response, 405)


def test_token_ids_and_case_insensitive_model(gw: EmbeddingsGateway, fake_provider: FakeProviderProcess) -> None:
    response = post(gw, {"model": "OpenAI/Text-Embedding-Ada-002", "input": [[15339, 1917], [15339]], "isQuery": True})
    assert response.status_code == 200, response.text
    assert len(response.json()["embeddings"]) == 2
    assert response.headers["X-Token-Usage"] == "3"  # the fake counts each token id
    assert gw.event_for(response)["metadata"]["model"] == ADA


def test_client_disconnect_aborts_upstream_and_is_charged(gw: EmbeddingsGateway, fake_provider: FakeProviderProcess) -> None:
    before = httpx.get(fake_provider.base_url + "/_fake/stats", timeout=10).json()["client_disconnects"]
    text = "slow fake:ttft_ms=5000 disconnect-1"
    with pytest.raises(httpx.ReadTimeout):
        post(gw, {"model": ADA, "input": [text]}, timeout=0.5)
    wait_until(
        lambda: httpx.get(fake_provider.base_url + "/_fake/stats", timeout=10).json()["client_disconnects"] > before,
        what="the upstream request to be aborted",
    )
    event = wait_until(
        lambda: next((e for e in gw.events("EmbeddingsFinished") if e["metadata"].get("outcome") == "client_disconnected"), None),
        what="the client_disconnected event",
    )
    # The upstream was asked: its estimate is charged (SPEC point 14), nothing was answered.
    assert event["metadata"]["tokens_used"] == count_tokens(text) and event["metadata"]["resolved_status_code"] is None


# -- token quota -----------------------------------------------------------------------------

TEN = "one two three four five six seven eight nine ten"


def test_tokenizer_agrees_with_the_fake() -> None:
    # The quota tests rely on inputs whose cl100k count equals the fake's word count.
    assert count_tokens(TEN) == len(TEN.split()) == 10


def burst(gw: GatewayProcess, tok: str, n: int, inputs: list[str]) -> list[httpx.Response]:
    results: list[httpx.Response] = []
    lock = threading.Lock()
    start = threading.Barrier(n)

    def one() -> None:
        start.wait()
        response = post(gw, {"model": ADA, "input": inputs}, tok=tok)
        with lock:
            results.append(response)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def check_quota_burst(gw: EmbeddingsGateway, fake: FakeProviderProcess, tok: str, user: str) -> None:
    # 12 concurrent batches of 20 tokens against a 100-token quota: exactly 5 fit.
    results = burst(gw, tok, 12, [TEN, TEN])
    ok = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code == 429]
    assert len(ok) + len(refused) == 12, [r.text for r in results]
    charged = sum(int(r.headers["X-Token-Usage"]) for r in ok)
    assert len(ok) == 5 and charged == 100
    assert len(upstream_requests(fake, user=user)) == 5
    for r in refused:
        body = r.json()
        assert error_message(body, "/v1/embeddings").startswith('you have exceeded the rate limit of 100 requests'), body
        assert int(r.headers["Retry-After"]) >= 1
        assert r.headers["X-RateLimit-Limit"] == "100" and r.headers["X-RateLimit-Remaining"] == "0"
    # The 7 refusals of one burst fall in one sampling window: one RateLimited event.
    limited = wait_until(lambda: [e for e in gw.events("RateLimited") if e["identifier"] == user], what="a RateLimited event")
    assert [e["metadata"]["refusals"] for e in limited] == [1]
    assert {e["metadata"]["feature"] for e in limited} == {"embeddings"}
    assert {e["metadata"]["cause"] for e in limited} == {"quota"}
    # Not one more token, whatever the batch size.
    assert post(gw, {"model": ADA, "input": ["one"]}, tok=tok).status_code == 429


def test_quota_in_tokens_across_concurrent_batches(gw: EmbeddingsGateway, fake_provider: FakeProviderProcess) -> None:
    check_quota_burst(gw, fake_provider, QUOTA, "emb-quota")


@pytest.mark.timeout(90)
def test_quota_in_tokens_with_redis(launch: Callable[..., EmbeddingsGateway], fake_provider: FakeProviderProcess, redis_server: Any) -> None:
    gw = launch(env={"REDIS_ENDPOINT": redis_server.url})
    check_quota_burst(gw, fake_provider, QUOTA_REDIS, "emb-quota-redis")


def test_reservation_settles_to_the_provider_count(gw: EmbeddingsGateway) -> None:
    long_word = "antidisestablishmentarianism"  # 6 cl100k tokens, 1 word for the fake
    estimate = count_tokens(long_word)
    assert estimate > 1
    first = post(gw, {"model": ADA, "input": [long_word]}, tok=SETTLE)
    assert first.status_code == 200 and first.headers["X-Token-Usage"] == "1"
    # Admission reserved the estimate.
    assert int(first.headers["X-RateLimit-Remaining"]) == 100 - estimate

    # Afterwards only the provider's count stays charged: the next reservation sees 99 left.
    def remaining_after_settle() -> int | None:
        r = post(gw, {"model": ADA, "input": ["one"]}, tok=SETTLE)
        assert r.status_code == 200
        value = int(r.headers["X-RateLimit-Remaining"])
        return value if value >= 97 else None

    assert wait_until(remaining_after_settle, timeout=5) in (97, 98)


def test_usage_missing_upstream_charges_the_estimate(gw: EmbeddingsGateway) -> None:
    text = "antidisestablishmentarianism fake:no_usage=1"
    response = post(gw, {"model": ADA, "input": [text]})
    assert response.status_code == 200, response.text
    assert response.headers["X-Token-Usage"] == str(count_tokens(text))
    assert gw.event_for(response)["metadata"]["tokens_used"] == count_tokens(text)


def test_batch_larger_than_the_whole_quota_is_400(gw: EmbeddingsGateway, fake_provider: FakeProviderProcess) -> None:
    inputs = [TEN + " oversize-1"] * 6
    response = post(gw, {"model": ADA, "input": inputs}, tok=SMALL_QUOTA)
    assert_error(response, 400, "more than the embeddings limit of 50 tokens")
    assert with_text(fake_provider, "oversize-1") == []


def test_smega_is_free_but_refused_when_the_quota_is_overdrawn(launch: Callable[..., EmbeddingsGateway]) -> None:
    gw = launch(actors=[actor("emb-free", MAIN, embeddings=limits(20, "1h"))])
    smega = post(gw, {"model": SMEGA, "input": ["free smega"]})
    assert smega.status_code == 200 and smega.headers["X-Token-Usage"] == "0"
    assert post(gw, {"model": ADA, "input": [TEN, TEN]}).status_code == 200
    refused = post(gw, {"model": SMEGA, "input": ["now refused"]})
    assert refused.status_code == 429


# -- models listing and route registration ----------------------------------------------------


def listing(gw: GatewayProcess, tok: str) -> list[dict[str, Any]]:
    response = httpx.get(gw.base_url + "/v1/embeddings/models", headers={"Authorization": f"Bearer {tok}"}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def test_models_listing_per_actor(gw: EmbeddingsGateway) -> None:
    everything = listing(gw, MAIN)
    names = [m["name"] for m in everything]
    assert names[:3] == [ADA, SMEGA, METADATA]
    assert set(names) == {ADA, SMEGA, METADATA, SMALL, LARGE}
    by_name = {m["name"]: m for m in everything}
    assert by_name[ADA] == {"name": ADA, "dimensions": 1536, "enabled": True, "deprecated": False}
    assert by_name[SMEGA]["dimensions"] == 768 and by_name[SMEGA]["enabled"] is True
    assert by_name[LARGE]["dimensions"] == 3072 and by_name[LARGE]["enabled"] is True
    assert by_name[METADATA]["enabled"] is False
    assert {m["name"] for m in listing(gw, ADA_ONLY) if m["enabled"]} == {ADA}
    assert not any(m["enabled"] for m in listing(gw, NO_EMBEDDINGS))
    assert httpx.get(gw.base_url + "/v1/embeddings/models", timeout=10).status_code == 403


def test_routes_follow_provider_credentials(launch: Callable[..., EmbeddingsGateway]) -> None:
    none = launch(env={"CODY_GATEWAY_OPENAI_ACCESS_TOKEN": "", "CODY_GATEWAY_SOURCEGRAPH_EMBEDDINGS_API_TOKEN": ""})
    for path in ("/v1/embeddings", "/openai/v1/embeddings"):
        assert_error(post(none, {"model": ADA, "input": ["x"]}, path=path), 404, "embeddings are disabled on this gateway: set")
    assert httpx.get(none.base_url + "/v1/embeddings/models", headers={"Authorization": f"Bearer {MAIN}"}, timeout=10).status_code == 404
    assert "embeddings are disabled" in none.process.output()

    openai_only = launch(env={"CODY_GATEWAY_SOURCEGRAPH_EMBEDDINGS_API_TOKEN": ""})
    assert post(openai_only, {"model": ADA, "input": ["x"]}).status_code == 200
    assert_error(post(openai_only, {"model": SMEGA, "input": ["x"]}), 400, "not configured on this gateway")
    enabled = {m["name"] for m in listing(openai_only, MAIN) if m["enabled"]}
    assert enabled == {ADA, SMALL, LARGE}
