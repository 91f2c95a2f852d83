"""Anthropic text completions (legacy): POST /v1/completions/anthropic -> {api_url}/v1/complete.

Reference section 4.2, with these deliberate fixes:
- zero values the client sent (``temperature: 0``) are forwarded, not dropped
  (Go's omitempty turned "deterministic" into the provider's default);
- an ``anthropic/`` prefix on the model is accepted and stripped, as on the
  Messages route;
- the stream is read in both of the API's shapes: data-only events that carry
  the whole completion so far (``anthropic-version: 2023-01-01``, what the
  gateway sends), and named ``completion`` events that carry increments;
- the provider reports no token counts, so both counts come from the offline
  tokenizer and are reported as tokenizer counts too; unknown is None, not -1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from conf.model import AnthropicConfig
from errors import BadRequest
from upstreams.base import IDENTITY_ENCODING, CallInfo, FlagInput, UpstreamRequest, json_body
from upstreams.buffered_call import BufferedCall, at_least_one
from upstreams.decode import (
    known_fields,
    opt_bool,
    opt_int,
    opt_number,
    opt_str,
    opt_str_list,
    parse_body,
)

PROVIDER = "anthropic"
# The version the reference sends; it selects the cumulative stream shape its
# clients parse, so it is part of the wire contract.
API_VERSION = "2023-01-01"
REQUEST_FIELDS = (
    "prompt", "model", "max_tokens_to_sample", "stop_sequences", "stream",
    "temperature", "top_k", "top_p", "metadata",
)


class AnthropicLegacyCall(BufferedCall):
    def _on_event(self, name: bytes, data: bytes) -> None:
        event = self._json(data)
        if event is None:
            return
        if name == b"error" or event.get("type") == "error":
            error = event.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            self.in_band_error = str(message or "error")
            return
        completion = event.get("completion")
        if not isinstance(completion, str):
            return
        if name == b"completion":
            self._add_text(completion)
        elif not name:
            self._replace_text(completion)

    def _on_body(self, data: dict[str, Any]) -> None:
        completion = data.get("completion")
        if isinstance(completion, str):
            self._replace_text(completion)

    def stream_error_event(self, message: str) -> bytes:
        payload = orjson.dumps({"type": "error", "error": {"type": "api_error", "message": message}})
        return b"event: error\ndata: " + payload + b"\n\n"


class AnthropicLegacyProvider:
    name = PROVIDER
    operation = "v1.completions.anthropic"
    default_retry_after_s = 2

    def __init__(self, config: AnthropicConfig) -> None:
        self._config = config
        self._url = config.api_url.rstrip("/") + "/v1/complete"
        self._headers = {
            "Cache-Control": "no-cache",
            "Accept": "application/json",
            "Content-Type": "application/json",
            "Client": "sourcegraph-cody-gateway/1.0",
            "X-API-Key": config.access_token,
            "anthropic-version": API_VERSION,
            **IDENTITY_ENCODING,
        }
        self.allowed_models = tuple(f"{PROVIDER}/{m}" for m in config.allowed_models)

    def virtual_models(self) -> dict[str, frozenset[str]]:
        return {}

    def parse(
        self, body: bytes, *, feature: str, identifier: str, headers: Mapping[str, str]
    ) -> AnthropicLegacyCall:
        data = known_fields(parse_body(body), REQUEST_FIELDS)
        prompt = opt_str(data, "prompt") or ""
        requested_model = opt_str(data, "model") or ""
        max_tokens = at_least_one(opt_int(data, "max_tokens_to_sample"), "max_tokens_to_sample") or 0
        if max_tokens > self._config.max_tokens_to_sample:
            raise BadRequest(
                f"max_tokens_to_sample exceeds maximum allowed value of {self._config.max_tokens_to_sample}: {max_tokens}"
            )
        stream = bool(opt_bool(data, "stream"))
        model = requested_model.removeprefix(f"{PROVIDER}/")

        upstream: dict[str, Any] = {"prompt": prompt, "model": model, "max_tokens_to_sample": max_tokens}
        for key, value in (
            ("stop_sequences", opt_str_list(data, "stop_sequences")),
            ("temperature", opt_number(data, "temperature")),
            ("top_k", opt_int(data, "top_k")),
            ("top_p", opt_number(data, "top_p")),
        ):
            if value is not None:
                upstream[key] = value
        if stream:
            upstream["stream"] = True
        # The client's metadata is never forwarded: user_id is ours (abuse tracing).
        upstream["metadata"] = {"user_id": identifier}

        return AnthropicLegacyCall(
            UpstreamRequest(url=self._url, headers=self._headers, body=json_body(upstream)),
            CallInfo(
                model=model,
                stream=stream,
                metadata={"stream": stream, "max_tokens_to_sample": max_tokens},
                max_tokens=max_tokens or None,
            ),
            FlagInput(model=model, prompt=prompt, max_tokens=max_tokens, uses_tokenizer=True),
            prompt_chars=len(prompt),
            prompt_text=prompt,
        )
