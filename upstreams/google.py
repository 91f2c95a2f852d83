"""Google Gemini: POST /v1/completions/google ->
{api_url}/v1beta/models/<model>:generateContent?key=<token>, or, streaming,
{api_url}/v1beta/models/<model>:streamGenerateContent?key=<token>&alt=sse.

Reference section 4.6: the key travels in the query string (the only
credential Gemini takes this way), ``stream`` is the client's switch between
the two methods and is not sent upstream, ``generationConfig`` is always
sent (possibly ``{}``). Deliberate fixes:
- zero values the client sent are forwarded, not dropped;
- ``candidateCount`` is capped at 1, like ``n`` for OpenAI and Fireworks
  (more candidates would multiply the cost of one admitted request);
- ``systemInstruction`` may be a string (the reference's shape) or a Content
  object (the API's shape); it is always sent as a Content object, which is
  what the API accepts;
- the model is escaped into the URL path, so a model name cannot change the path;
- usage comes from the last ``usageMetadata`` seen anywhere in the stream
  (the reference only looked at the last line), thinking tokens count as
  completion tokens, and characters are counted over every part;
- every part type the API takes (``inlineData``, ``fileData``,
  ``functionCall``, ``functionResponse``, ``thought`` parts, ...) is forwarded
  as sent after a structure check; text parts are forwarded as
  ``{"text": ...}`` as before, so a text-only request is byte-identical;
- ``tools`` (function declarations), ``toolConfig`` and ``cachedContent`` are
  forwarded, and in ``generationConfig`` also ``thinkingConfig``,
  ``responseMimeType``, ``responseSchema`` and the rest of
  ``GENERATION_PASSTHROUGH`` (the API as documented on 2026-12-01);
- usage by component: ``cachedContentTokenCount`` (cache reads, part of the
  prompt count) and ``thoughtsTokenCount`` (reasoning, part of the completion
  count); a stream's running ``usageMetadata`` is provisional until the chunk
  that finishes the candidate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import orjson

from conf.model import GoogleConfig
from errors import BadRequest
from upstreams.base import IDENTITY_ENCODING, CallInfo, FlagInput, UpstreamRequest, json_body
from upstreams.buffered_call import BufferedCall, at_least_one, usage_count
from upstreams.decode import (
    check_nesting,
    dropped_fields,
    known_fields,
    opt_bool,
    opt_int,
    opt_list,
    opt_number,
    opt_object,
    opt_str,
    opt_str_list,
    parse_body,
    passthrough,
    require_object,
)

PROVIDER = "google"
CORE_FIELDS = ("model", "contents", "generationConfig", "safetySettings", "systemInstruction", "stream")
# Other top-level fields, forwarded as sent (after a structure check).
PASSTHROUGH_FIELDS: dict[str, type] = {"tools": list, "toolConfig": dict, "cachedContent": str}
REQUEST_FIELDS = CORE_FIELDS + tuple(PASSTHROUGH_FIELDS)
CORE_GENERATION_FIELDS = ("temperature", "topP", "topK", "stopSequences", "maxOutputTokens", "candidateCount")
GENERATION_PASSTHROUGH: dict[str, type] = {
    "thinkingConfig": dict,
    "responseMimeType": str,
    "responseSchema": dict,
    "responseJsonSchema": dict,
    "presencePenalty": object,
    "frequencyPenalty": object,
    "seed": int,
    "responseLogprobs": bool,
    "logprobs": int,
    "responseModalities": list,
    "mediaResolution": str,
    "speechConfig": dict,
}
GENERATION_FIELDS = CORE_GENERATION_FIELDS + tuple(GENERATION_PASSTHROUGH)
# The same, named by their path (for error messages).
_PREFIXED_GENERATION_PASSTHROUGH = {f"generationConfig.{k}": t for k, t in GENERATION_PASSTHROUGH.items()}
MAX_PARTS = 10_000


def _parts(value: Any, path: str) -> list[dict[str, Any]]:
    raw_parts = value if isinstance(value, list) else None
    if raw_parts is None:
        raise BadRequest(f"failed to parse request body: field {path!r} must be a list of parts")
    if len(raw_parts) > MAX_PARTS:
        raise BadRequest(f"failed to parse request body: field {path!r} has more than {MAX_PARTS} parts")
    parts: list[dict[str, Any]] = []
    for i, raw in enumerate(raw_parts):
        where = f"{path}[{i}]"
        part = require_object(raw, where)
        if not part:
            raise BadRequest(f"failed to parse request body: part {where} is empty")
        text = part.get("text")
        if isinstance(text, str) and len(part) == 1:
            parts.append({"text": text})
            continue
        text = opt_str(part, "text", f"{where}.text")
        if text is not None:
            out: dict[str, Any] = {"text": text}
            for key, extra in part.items():
                if key != "text":
                    out[key] = extra
            if len(out) > 1:
                check_nesting(out, where)
            parts.append(out)
            continue
        check_nesting(part, where)
        parts.append(part)
    return parts


def _text_of(parts: list[dict[str, Any]]) -> list[str]:
    return [text for part in parts if isinstance(text := part.get("text"), str) and not part.get("thought")]


def _system_instruction(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return {"parts": [{"text": value}]} if value else None
    content = require_object(value, "systemInstruction")
    return {"parts": _parts(content.get("parts", []), "systemInstruction.parts")}


def _count(config: Mapping[str, Any], key: str) -> int | None:
    path = f"generationConfig.{key}"
    return at_least_one(opt_int(config, key, path), path)


def _generation_config(data: Mapping[str, Any]) -> dict[str, Any]:
    raw = opt_object(data, "generationConfig")
    if raw is None:
        return {}
    known = known_fields(raw, GENERATION_FIELDS)
    out: dict[str, Any] = {}
    for key, value in (
        ("temperature", opt_number(known, "temperature", "generationConfig.temperature")),
        ("topP", opt_number(known, "topP", "generationConfig.topP")),
        ("topK", opt_int(known, "topK", "generationConfig.topK")),
        ("stopSequences", opt_str_list(known, "stopSequences", "generationConfig.stopSequences")),
        ("maxOutputTokens", _count(known, "maxOutputTokens")),
        ("candidateCount", _count(known, "candidateCount")),
    ):
        if value is not None:
            out[key] = value
    if "candidateCount" in out:
        out["candidateCount"] = min(out["candidateCount"], 1)
    if any(k in GENERATION_PASSTHROUGH for k in known):
        extra = {f"generationConfig.{k}": v for k, v in known.items() if k in GENERATION_PASSTHROUGH}
        for key, value in passthrough(extra, _PREFIXED_GENERATION_PASSTHROUGH).items():
            out[key.removeprefix("generationConfig.")] = value
    return out


def _safety_settings(data: Mapping[str, Any]) -> list[dict[str, str]] | None:
    raw = opt_list(data, "safetySettings")
    if raw is None:
        return None
    out: list[dict[str, str]] = []
    for i, item in enumerate(raw):
        setting = require_object(item, f"safetySettings[{i}]")
        entry: dict[str, str] = {}
        for key in ("category", "threshold"):
            value = opt_str(setting, key, f"safetySettings[{i}].{key}")
            if value is not None:
                entry[key] = value
        out.append(entry)
    return out


class GoogleCall(BufferedCall):
    def _on_event(self, name: bytes, data: bytes) -> None:
        event = self._json(data)
        if event is None:
            return
        if self._took_error(event, "candidates"):
            return
        self._read(event)

    def _on_body(self, data: dict[str, Any]) -> None:
        self._read(data, final=True)
        if self._usage.completion_chars is None:
            self._usage.completion_chars = 0

    def _read(self, event: dict[str, Any], *, final: bool = False) -> None:
        candidates = event.get("candidates")
        if isinstance(candidates, list):
            for candidate in candidates:
                if not isinstance(candidate, dict):
                    continue
                if candidate.get("finishReason"):
                    final = True
                content = candidate.get("content")
                parts = content.get("parts") if isinstance(content, dict) else None
                if isinstance(parts, list):
                    for part in parts:
                        if not isinstance(part, dict):
                            continue
                        # Thought summaries are not part of the answer.
                        if isinstance(part.get("text"), str) and not part.get("thought"):
                            self._add_text(part["text"])
                        elif isinstance(part.get("functionCall"), dict):
                            try:
                                self._add_text(orjson.dumps(part["functionCall"]).decode())
                            except orjson.JSONEncodeError:
                                pass
        usage = event.get("usageMetadata")
        if isinstance(usage, dict):
            prompt = usage_count(usage.get("promptTokenCount"))
            candidates_tokens = usage_count(usage.get("candidatesTokenCount"))
            thoughts = usage_count(usage.get("thoughtsTokenCount"))
            cached = usage_count(usage.get("cachedContentTokenCount"))
            if prompt is not None:
                self._usage.prompt_tokens = prompt
            if cached is not None:
                self._usage.cache_read_tokens = cached
            if thoughts is not None:
                self._usage.reasoning_tokens = thoughts
            if candidates_tokens is not None or thoughts is not None:
                completion = (candidates_tokens or 0) + (thoughts or 0)
                if final:
                    self._usage.completion_tokens = completion
                else:
                    # A running count: it never wins over a count of what was relayed.
                    self._set_provisional_completion(completion)

    def stream_error_event(self, message: str) -> bytes:
        payload = orjson.dumps({"error": {"code": 500, "message": message, "status": "INTERNAL"}})
        return b"data: " + payload + b"\r\n\r\n"


class GoogleProvider:
    name = PROVIDER
    operation = "v1.completions.google"
    default_retry_after_s = 3

    def __init__(self, config: GoogleConfig, *, max_messages: int) -> None:
        self._base = config.api_url.rstrip("/") + "/v1beta/models/"
        self._key = quote(config.access_token, safe="")
        self._headers = {"Content-Type": "application/json", **IDENTITY_ENCODING}
        self._max_messages = max_messages
        self.allowed_models = tuple(f"{PROVIDER}/{m}" for m in config.allowed_models)

    def virtual_models(self) -> dict[str, frozenset[str]]:
        return {}

    def url(self, model: str, stream: bool) -> str:
        path = self._base + quote(model, safe="")
        if stream:
            return f"{path}:streamGenerateContent?key={self._key}&alt=sse"
        return f"{path}:generateContent?key={self._key}"

    def parse(
        self, body: bytes, *, feature: str, identifier: str, headers: Mapping[str, str]
    ) -> GoogleCall:
        raw_data = parse_body(body)
        data = known_fields(raw_data, REQUEST_FIELDS)
        raw_contents = opt_list(data, "contents") or []
        if len(raw_contents) > self._max_messages:
            raise BadRequest(f"too many contents: {len(raw_contents)} (at most {self._max_messages})")
        contents: list[dict[str, Any]] = []
        for i, raw in enumerate(raw_contents):
            item = require_object(raw, f"contents[{i}]")
            entry: dict[str, Any] = {}
            role = opt_str(item, "role", f"contents[{i}].role")
            if role:
                entry["role"] = role
            entry["parts"] = _parts(item.get("parts", []), f"contents[{i}].parts")
            contents.append(entry)
        system = _system_instruction(data.get("systemInstruction"))
        generation = _generation_config(data)
        safety = _safety_settings(data)
        stream = bool(opt_bool(data, "stream"))
        model = (opt_str(data, "model") or "").removeprefix(f"{PROVIDER}/")

        upstream: dict[str, Any] = {"model": model, "contents": contents, "generationConfig": generation}
        if safety:
            upstream["safetySettings"] = safety
        if system is not None:
            upstream["systemInstruction"] = system
        upstream.update(passthrough(data, PASSTHROUGH_FIELDS))

        texts = _text_of((system or {}).get("parts", []))
        for content in contents:
            for part in content["parts"]:
                text = part.get("text")
                if isinstance(text, str) and not part.get("thought"):
                    texts.append(text)
        prompt = "".join(text + "\n" for text in texts)
        max_tokens = generation.get("maxOutputTokens")
        return GoogleCall(
            UpstreamRequest(url=self.url(model, stream), headers=self._headers, body=json_body(upstream)),
            CallInfo(
                model=model,
                stream=stream,
                metadata={"stream": stream},
                max_tokens=max_tokens,
                dropped_fields=dropped_fields(raw_data, REQUEST_FIELDS, kept=data),
            ),
            FlagInput(model=model, prompt=prompt, max_tokens=max_tokens or 0, uses_tokenizer=False),
            prompt_chars=len(prompt),
            prompt_text=prompt,
        )
