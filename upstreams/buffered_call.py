"""What every per-request provider call shares: watching the relayed body for usage.

A provider call sees each relayed chunk once (``feed``) and is told once that
the body ended or was cut short (``finish``). Streams go through the
incremental SSE parser and the subclass reads each event; other bodies are
kept (bounded) and decoded as one JSON document at the end. Whatever the
provider did not report is filled in from the offline tokenizer, so a count
is either the provider's own number, a tokenizer count, or None (unknown).

Two rules about numbers from upstream (issue 17, items 6 and 7):
- every usage number is bounded where it is parsed (``usage_count``): a
  number outside 0..``MAX_USAGE_TOKENS`` is treated as not reported, so it
  can reach neither the event, the limiter nor a metric;
- a count the provider marks provisional (Anthropic's ``message_start``
  placeholder, Gemini's running ``usageMetadata``, an OpenAI-style usage on
  a chunk that is not the last) never wins over a count of what was
  actually relayed: when the final count never came, the completion count is
  the larger of the provisional one and the tokenizer's count of the relayed
  text.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from errors import BadRequest
from upstreams.base import CallInfo, FlagInput, UpstreamRequest, Usage
from upstreams.sse import SSEParser
from upstreams.tokenizer import count_tokens

log = logging.getLogger("gateway.upstreams")

# Completion text counted for the tokenizer fallback; beyond it the count is
# scaled from the counted part (bounded CPU for any completion size).
MAX_TEXT_FOR_TOKENIZER = 2_000_000
# The fallback counts the relayed text as it comes, in pieces of about this
# many characters (cut before a space, where cl100k splits anyway), so a
# stream holds at most one piece of text, whatever its length.
COUNT_PIECE_CHARS = 2048
# Pending text pieces joined into one string past this many.
_JOIN_PIECES = 16
# A non-streamed response body larger than this is relayed but not parsed.
MAX_BODY_FOR_USAGE = 8 << 20
# The largest usage number taken from an upstream (2**32: the largest context
# windows are about 2 * 10**6 tokens); above it the number is "not reported".
MAX_USAGE_TOKENS = 1 << 32


class BufferedCall:
    """Base of the provider calls; subclasses implement ``_on_event``, ``_on_body``
    and ``stream_error_event``."""

    def __init__(
        self,
        upstream: UpstreamRequest,
        info: CallInfo,
        flag: FlagInput | None,
        *,
        prompt_chars: int,
        prompt_text: str,
    ) -> None:
        self.info = info
        self._request = upstream
        self._flag = flag
        self._prompt_text = prompt_text
        self._usage = Usage(prompt_chars=prompt_chars)
        # Relayed completion text not counted yet, and what was counted so far.
        self._text: list[str] = []
        self._text_len = 0
        self._counted_chars = 0
        self._counted_tokens = 0
        self._body = bytearray()
        self._body_overflow = False
        self._parser = SSEParser(self._on_event) if info.stream else None
        self._finished = False
        # Counts the provider marked provisional (see the module docstring).
        self._provisional_completion: int | None = None
        # Set when the provider itself ended a 200 stream with an error event.
        self.in_band_error: str | None = None
        # Set when the provider broke its own wire format (an event that is not
        # JSON, not UTF-8, or too large): the relay stops and says so in-band.
        self.protocol_error: str | None = None

    # -- ProviderCall ------------------------------------------------------------

    def upstream_request(self) -> UpstreamRequest:
        return self._request

    def flag_input(self) -> FlagInput | None:
        return self._flag

    def feed(self, chunk: bytes) -> bytes | None:
        if self._finished:
            return None
        if self._parser is not None:
            self._parser.feed(chunk)
            if self._parser.protocol_error is not None and self.protocol_error is None:
                self.protocol_error = self._parser.protocol_error
        elif not self._body_overflow:
            if len(self._body) + len(chunk) > MAX_BODY_FOR_USAGE:
                self._body_overflow = True
                self._body = bytearray()
            else:
                self._body += chunk
        return None

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._parser is not None:
            self._parser.close()
            # The parser holds this call's event callback: a reference cycle per
            # stream for the garbage collector, unless cut once parsing is over.
            self._parser = None
        elif self._body:
            try:
                data = orjson.loads(self._body)
            except orjson.JSONDecodeError:
                data = None
            self._body = bytearray()
            if isinstance(data, dict):
                self._on_body(data)
        elif self._body_overflow:
            log.warning("%s response too large to count usage", self.__class__.__name__)
        self._fill_from_tokenizer()

    def usage(self) -> Usage:
        return self._usage

    def set_prompt_tokenizer_tokens(self, count: int) -> None:
        """The flagging step counts the prompt once; the count is reused here."""
        self._usage.prompt_tokenizer_tokens = count

    def stream_error_event(self, message: str) -> bytes:
        raise NotImplementedError

    # -- for subclasses ------------------------------------------------------------

    def _on_event(self, name: bytes, data: bytes) -> None:
        raise NotImplementedError

    def _on_body(self, data: dict[str, Any]) -> None:
        raise NotImplementedError

    def _took_error(self, event: dict[str, Any], content_key: str) -> bool:
        """Record an event that is the provider's own error (an ``error`` and no content)."""
        if "error" not in event or content_key in event:
            return False
        error = event["error"]
        self.in_band_error = str((error.get("message") if isinstance(error, dict) else error) or "error")
        return True

    def _read_usage(self, usage: Any) -> None:
        """OpenAI-shaped ``usage`` (OpenAI and Fireworks): prompt and completion tokens."""
        if not isinstance(usage, dict):
            return
        self._read_openai_usage(usage, final=True)

    def _read_openai_usage(self, usage: dict[str, Any], *, final: bool) -> None:
        prompt = usage_count(usage.get("prompt_tokens"))
        completion = usage_count(usage.get("completion_tokens"))
        if prompt is not None:
            self._usage.prompt_tokens = prompt
        prompt_details = usage.get("prompt_tokens_details")
        if isinstance(prompt_details, dict):
            cached = usage_count(prompt_details.get("cached_tokens"))
            if cached is not None:
                self._usage.cache_read_tokens = cached
        completion_details = usage.get("completion_tokens_details")
        if isinstance(completion_details, dict):
            reasoning = usage_count(completion_details.get("reasoning_tokens"))
            if reasoning is not None:
                self._usage.reasoning_tokens = reasoning
        if completion is not None:
            if final:
                self._usage.completion_tokens = completion
            else:
                self._set_provisional_completion(completion)

    def _set_provisional_completion(self, count: int) -> None:
        """A running or placeholder completion count: used only if no final one comes,
        and then only if it is larger than the count of the relayed text."""
        self._provisional_completion = count

    def _add_text(self, text: str) -> None:
        if not text:
            self._usage.completion_chars = self._usage.completion_chars or 0
            return
        usage = self._usage
        usage.completion_chars = (usage.completion_chars or 0) + len(text)
        # The text only feeds the tokenizer fallback, which never runs once the
        # provider reported its final completion tokens (a reported count is
        # never taken back). Until then it is counted piece by piece.
        if usage.completion_tokens is None and self._counted_chars + self._text_len < MAX_TEXT_FOR_TOKENIZER:
            pending = self._text
            pending.append(text)
            self._text_len += len(text)
            if self._text_len >= COUNT_PIECE_CHARS:
                self._count_pending()
            elif len(pending) >= _JOIN_PIECES:
                # A stream's deltas are a few characters each; one string instead of
                # dozens of small ones keeps an open stream's memory down.
                self._text = ["".join(pending)]

    def _count_pending(self) -> None:
        """Count the pending text up to its last space before a word (cl100k never
        joins a space to what precedes it), keeping the rest pending."""
        text = "".join(self._text)
        cut = len(text) - 1
        while cut > 0:
            cut = text.rfind(" ", 0, cut)
            if cut <= 0 or not text[cut + 1 : cut + 2].isspace():
                break
        if cut <= 0:
            if len(text) < 8 * COUNT_PIECE_CHARS:
                self._text = [text]
                return
            cut = len(text)  # one long run without a space: counted as it is
        self._counted_tokens += count_tokens(text[:cut])
        self._counted_chars += cut
        rest = text[cut:]
        self._text = [rest] if rest else []
        self._text_len = len(rest)

    def _replace_text(self, text: str) -> None:
        """For providers whose every event carries the whole completion so far."""
        self._usage.completion_chars = len(text)
        kept = text[:MAX_TEXT_FOR_TOKENIZER]
        self._text = [kept]
        self._text_len = len(kept)
        self._counted_chars = self._counted_tokens = 0

    def _json(self, data: bytes) -> dict[str, Any] | None:
        """An event's JSON object, or None for ``[DONE]`` and keep-alives.

        Data that starts like a JSON object but does not decode (truncated, not
        UTF-8) is a broken stream, not something to skip silently.
        """
        if not data.startswith(b"{"):
            return None
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            if self.protocol_error is None:
                self.protocol_error = "an event that is not valid JSON"
            return None
        return value if isinstance(value, dict) else None

    def _fill_from_tokenizer(self) -> None:
        usage = self._usage
        provisional = self._provisional_completion
        if usage.completion_tokens is None and (usage.completion_chars is not None or provisional is not None):
            counted = self._counted_tokens + count_tokens("".join(self._text))
            seen = self._counted_chars + self._text_len
            self._text = []
            total = usage.completion_chars or 0
            if total > seen > 0:
                counted = round(counted * total / seen)
            usage.completion_tokenizer_tokens = counted
            usage.completion_tokens = max(counted, provisional or 0)
        if usage.prompt_tokens is None:
            if usage.prompt_tokenizer_tokens is None:
                usage.prompt_tokenizer_tokens = count_tokens(self._prompt_text)
            usage.prompt_tokens = usage.prompt_tokenizer_tokens


def usage_count(value: Any) -> int | None:
    """A usage number as reported: ints in 0..MAX_USAGE_TOKENS only (bools, floats
    and out-of-range numbers are not counts: they are "not reported")."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_USAGE_TOKENS:
        return value
    if value is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        log.warning("ignoring an upstream usage number out of range: %.40s", repr(value))
    return None


def at_least_one(value: int | None, name: str) -> int | None:
    """A token or choice count from the client: absent, or a 400 below 1.

    A negative max-tokens would otherwise become a negative token reservation
    in the limiter (quota given back that was never taken).
    """
    if value is not None and value < 1:
        raise BadRequest(f"{name} must be at least 1: {value}")
    return value
