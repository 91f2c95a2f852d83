"""Sourcegraph embeddings ("SMEGA"): a KServe v2 inference endpoint (reference 5.2, second part).

The reference makes up to 3 attempts, sleeping 5^n ms with ±50 % jitter, to
ride out Triton 404s while the service scales down, and by a shadowed
variable answers 200 ``null`` when all of them fail. Here the attempts and
sleeps are the same, but a final failure is an error with a status.
The model reports no token usage, so nothing is charged (as in the reference).
"""

from __future__ import annotations

import uuid
from typing import Any

from conf.model import SourcegraphEmbeddingsConfig
from upstreams import transport as tp
from upstreams.base import IDENTITY_ENCODING, UpstreamRequest, json_body
from upstreams.embeddings import (
    SMEGA_DIMENSIONS,
    SOURCEGRAPH,
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
    texts_only,
)
from upstreams.retry import SMEGA_POLICY

AUTH_HEADER = "sourcegraph-smega-inference-auth"


class SmegaEmbeddingsClient:
    provider = SOURCEGRAPH
    label = "Sourcegraph"

    def __init__(self, config: SourcegraphEmbeddingsConfig, transport: tp.Transport, *, stall_s: float) -> None:
        self._stall_s = stall_s
        self._transport = transport
        self.url = config.api_url
        self._headers = {"Content-Type": "application/json", AUTH_HEADER: config.access_token, **IDENTITY_ENCODING}

    def validate(self, request: EmbeddingsRequest) -> None:
        texts_only(request)

    def estimate_tokens(self, request: EmbeddingsRequest) -> int:
        # Free in the reference: admission only asks that the quota is not overdrawn.
        return 0

    def upstream_request(self, request: EmbeddingsRequest) -> UpstreamRequest:
        texts = texts_only(request)
        body: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "inputs": [{"name": "TEXT", "shape": [len(texts)], "datatype": "BYTES", "data": list(texts)}],
        }
        return UpstreamRequest(self.url, self._headers, json_body(body))

    async def embed(self, request: EmbeddingsRequest, exchange: Exchange) -> EmbeddingsResult:
        # Any failure is retried (the 404s of a scale-down are the point), except running out of time.
        reply = await post_with_retries(self._transport, self.upstream_request(request), exchange, SMEGA_POLICY)
        if reply.attempt.outcome != tp.OK or reply.attempt.status != 200:
            raise failure(reply, self.label, self.url, stall_s=self._stall_s)
        if reply.truncated:
            raise invalid_response(self.label, "response too large")
        return await off_loop(len(reply.body), lambda: self._parse(reply, request))

    def _parse(self, reply: Reply, request: EmbeddingsRequest) -> EmbeddingsResult:
        data = parse_json(reply.body, self.label)
        outputs = data.get("outputs") if isinstance(data, dict) else None
        first = outputs[0] if isinstance(outputs, list) and outputs else None
        flat = first.get("data") if isinstance(first, dict) else None
        expected = len(request.inputs) * SMEGA_DIMENSIONS
        if not isinstance(flat, list) or len(flat) != expected:
            raise invalid_response(self.label, f"expected {expected} floats in outputs[0].data")
        if not float_vector(flat):
            raise invalid_response(self.label, "outputs[0].data holds non-numbers")
        vectors = [flat[i : i + SMEGA_DIMENSIONS] for i in range(0, expected, SMEGA_DIMENSIONS)]
        return EmbeddingsResult(vectors=vectors, model=request.model.name, dimensions=SMEGA_DIMENSIONS, tokens_used=0)
