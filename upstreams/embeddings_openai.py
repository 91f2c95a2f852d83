"""OpenAI embeddings: {api_url}/v1/embeddings (reference 5.2, first part).

Retries follow the completions policy (upstream.retry_*): 429, 5xx, connect
errors and resets, with exponential backoff or the provider's Retry-After
when it is short enough; the response is buffered, so a retry is always safe.
Token counts come from the provider's ``usage.total_tokens``; cl100k is
these models' own tokenizer, so the admission estimate is normally exact.
"""

from __future__ import annotations

from typing import Any

from conf.model import OpenAIConfig, UpstreamConfig
from errors import BadRequest
from upstreams import transport as tp
from upstreams.base import IDENTITY_ENCODING, UpstreamRequest, json_body
from upstreams.embeddings import (
    OPENAI,
    OPENAI_SHORTENABLE_PREFIX,
    EmbeddingsRequest,
    EmbeddingsResult,
    Exchange,
    Reply,
    failure,
    float_vector,
    invalid_response,
    off_loop,
    parse_json,
    post_with_retries,
)
from upstreams.retry import upstream_policy
from upstreams.tokenizer import count_tokens

EMPTY_STRING_MESSAGE = "cannot generate embeddings for an empty string"


class OpenAIEmbeddingsClient:
    provider = OPENAI
    label = "OpenAI"

    def __init__(self, config: OpenAIConfig, upstream: UpstreamConfig, transport: tp.Transport) -> None:
        self._transport = transport
        self._upstream = upstream
        self._policy = upstream_policy(upstream)
        self.url = config.api_url.rstrip("/") + "/v1/embeddings"
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {config.access_token}", **IDENTITY_ENCODING}
        if config.org_id:
            headers["OpenAI-Organization"] = config.org_id
        self._headers = headers

    def validate(self, request: EmbeddingsRequest) -> None:
        for item in request.inputs:
            if isinstance(item, str) and not item:
                raise BadRequest(EMPTY_STRING_MESSAGE)
            if isinstance(item, list) and not item:
                raise BadRequest("cannot generate embeddings for an empty token list")
        if request.dimensions is not None and not request.model.upstream_name.startswith(OPENAI_SHORTENABLE_PREFIX):
            raise BadRequest(f"model {request.model.name} does not support the dimensions parameter")

    def estimate_tokens(self, request: EmbeddingsRequest) -> int:
        return sum(count_tokens(item) if isinstance(item, str) else len(item) for item in request.inputs)

    def upstream_request(self, request: EmbeddingsRequest) -> UpstreamRequest:
        body: dict[str, Any] = {"model": request.model.upstream_name, "input": request.inputs, "user": request.user}
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        return UpstreamRequest(self.url, self._headers, json_body(body))

    async def embed(self, request: EmbeddingsRequest, exchange: Exchange) -> EmbeddingsResult:
        reply = await post_with_retries(self._transport, self.upstream_request(request), exchange, self._policy)
        if reply.attempt.outcome != tp.OK or reply.attempt.status != 200:
            raise failure(reply, self.label, self.url, stall_s=self._upstream.stall_timeout_s)
        if reply.truncated:
            raise invalid_response(self.label, "response too large")
        return await off_loop(len(reply.body), lambda: self._parse(reply, request))

    def _parse(self, reply: Reply, request: EmbeddingsRequest) -> EmbeddingsResult:
        data = parse_json(reply.body, self.label)
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list) or len(items) != len(request.inputs):
            raise invalid_response(self.label, f"expected {len(request.inputs)} embeddings")
        ordered: list[tuple[int, list[float]]] = []
        for item in items:
            index = item.get("index") if isinstance(item, dict) else None
            vector = item.get("embedding") if isinstance(item, dict) else None
            if type(index) is not int or not float_vector(vector):
                raise invalid_response(self.label, "an embedding without an index or a float vector")
            ordered.append((index, vector))
        ordered.sort(key=lambda pair: pair[0])
        if [i for i, _ in ordered] != list(range(len(ordered))):
            raise invalid_response(self.label, "embedding indexes are not 0..n-1")
        vectors = [v for _, v in ordered]
        dims = len(vectors[0]) if vectors else request.dimensions or request.model.dimensions
        if any(len(v) != dims for v in vectors):
            raise invalid_response(self.label, "embeddings of different lengths")
        usage = data.get("usage")
        tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
        model = data.get("model")
        return EmbeddingsResult(
            vectors=vectors,
            model=model if isinstance(model, str) and model else request.model.upstream_name,
            dimensions=dims,
            tokens_used=tokens if type(tokens) is int and tokens >= 0 else None,
        )
