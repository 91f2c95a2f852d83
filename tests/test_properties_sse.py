"""Property tests for the incremental SSE parser (upstreams/sse.py).

The oracle below parses a whole stream at once, following the SSE format's
line rules (LF, CRLF or a lone CR end a line) and the parser's documented
size rule (a line longer than the cap, or an event whose data adds up to
more, is dropped up to its blank line). Whatever the chunk boundaries, the
incremental parser must produce exactly the oracle's events and drop counts.
"""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_fuzz_support import counted, examples, fuzz_summary  # noqa: F401  (fixture)
from upstreams.sse import SSEParser

_LINE_END = re.compile(rb"\r\n|\r|\n")


def oracle(stream: bytes, max_bytes: int) -> tuple[list[tuple[bytes, bytes]], int]:
    """(events, dropped events) for a complete stream, without chunking."""
    lines = _LINE_END.split(stream)
    # A final line without a terminator is still a line at end of stream.
    events: list[tuple[bytes, bytes]] = []
    dropped = 0
    name, size, skipping = b"", 0, False
    data: list[bytes] = []

    def drop() -> None:
        nonlocal dropped, name, data, size, skipping
        if not skipping:
            dropped += 1
        skipping, name, data, size = True, b"", [], 0

    for line in lines:
        if not line:
            if skipping:
                skipping = False
            elif data:
                events.append((name, b"\n".join(data)))
            name, data, size = b"", [], 0
            continue
        if skipping:
            continue
        if len(line) > max_bytes:
            drop()
            continue
        if line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            size += len(value)
            if size > max_bytes:
                drop()
                continue
            data.append(value)
        elif field == b"event":
            name = value.strip()
    if data and not skipping:
        events.append((name, b"\n".join(data)))
    return events, dropped


def run(chunks: list[bytes], max_bytes: int) -> tuple[list[tuple[bytes, bytes]], int]:
    events: list[tuple[bytes, bytes]] = []
    parser = SSEParser(lambda name, data: events.append((name, data)), max_event_bytes=max_bytes)
    for chunk in chunks:
        parser.feed(chunk)
    parser.close()
    assert parser.events == len(events)
    return events, parser.oversized


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    out, last = [], 0
    for point in points:
        out.append(stream[last:point])
        last = point
    out.append(stream[last:])
    return out


# Values: ASCII, JSON-ish text, raw bytes (partial and invalid UTF-8 included).
_VALUE = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
    st.text(max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass").replace(b"\n", b"").replace(b"\r", b"")),
    st.sampled_from([b'{"type":"ping"}', b"[DONE]", "é€😀".encode()[:5], b"\xff\xfe", b"\xe2\x82"]),
)
_FIELD = st.sampled_from([b"data", b"event", b"id", b"retry", b"", b"dat", b"DATA", b"data "])
_EOL = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    eol = draw(_EOL)
    if kind == 0:
        return eol  # blank line: end of event
    if kind == 1:
        return b":" + draw(_VALUE) + eol  # comment
    if kind == 2:
        return draw(st.binary(max_size=20)) + eol  # garbage, may hold its own line ends
    if kind == 3:
        return draw(_FIELD) + eol  # a field name alone
    sep = draw(st.sampled_from([b":", b": ", b":  "]))
    return draw(_FIELD) + sep + draw(_VALUE) + eol


_STREAM = st.lists(lines(), max_size=40).map(b"".join)
_CUTS = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)


@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=_STREAM, cuts=_CUTS, max_bytes=st.sampled_from([8, 24, 1 << 20]))
@counted("sse: chunking invariance vs oracle")
def test_any_chunking_gives_the_oracles_events(stream: bytes, cuts: list[int], max_bytes: int) -> None:
    assert run(split(stream, cuts), max_bytes) == oracle(stream, max_bytes)


@settings(max_examples=examples(150), deadline=None)
@given(stream=_STREAM)
@counted("sse: byte-by-byte feed")
def test_byte_by_byte_equals_whole(stream: bytes) -> None:
    whole = run([stream], 1 << 20)
    assert run([stream[i : i + 1] for i in range(len(stream))], 1 << 20) == whole


@settings(max_examples=examples(200), deadline=None)
@given(garbage=st.binary(max_size=300), cuts=_CUTS)
@counted("sse: arbitrary bytes never raise")
def test_arbitrary_bytes_never_raise(garbage: bytes, cuts: list[int]) -> None:
    run(split(garbage, cuts), 16)
    run(split(garbage, cuts), 1 << 20)


@settings(max_examples=examples(100), deadline=None)
@given(before=_STREAM, garbage=st.binary(max_size=60), after=_STREAM, cuts=_CUTS)
@counted("sse: garbage between events")
def test_garbage_between_events_does_not_eat_later_events(before: bytes, garbage: bytes, after: bytes, cuts: list[int]) -> None:
    # A well-formed event after a blank line always survives whatever came before it.
    good = b'event: message_delta\r\ndata: {"usage":{"output_tokens":7}}\n\n'
    stream = before + garbage + b"\n\n" + good + after
    events, _ = run(split(stream, cuts), 1 << 20)
    assert (b"message_delta", b'{"usage":{"output_tokens":7}}') in events


# Whole events in the shapes providers send, which the parser dispatches without
# going line by line when it is between events, mixed with shapes that must
# take the general path (comments, several data lines, no data, extra blank lines).
_NAME = st.sampled_from([b"content_block_delta", b"message_delta", b"", b" padded ", b"a:b", b"error"])


@st.composite
def provider_events(draw: st.DrawFn) -> bytes:
    value = draw(_VALUE)
    kind = draw(st.integers(0, 7))
    if kind <= 2:
        return b"data: " + value + b"\n\n"
    if kind <= 4:
        return b"event: " + draw(_NAME) + b"\ndata: " + value + b"\n\n"
    if kind == 5:
        return b"event: " + draw(_NAME) + b"\ndata: " + value + b"\ndata: " + draw(_VALUE) + b"\n\n"
    if kind == 6:
        return draw(st.sampled_from([b": ping\n\n", b"\n", b"event: x\n\n", b"data:" + value + b"\n\n"]))
    return draw(lines())


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(provider_events(), max_size=30),
    cuts=_CUTS,
    max_bytes=st.sampled_from([8, 24, 1 << 20]),
)
@counted("sse: whole provider-shaped events vs oracle")
def test_whole_events_in_any_chunking_give_the_oracles_events(pieces: list[bytes], cuts: list[int], max_bytes: int) -> None:
    stream = b"".join(pieces)
    expected = oracle(stream, max_bytes)
    assert run(split(stream, cuts), max_bytes) == expected
    # One chunk per event, as paced providers write them, and all in one chunk, as unpaced ones do.
    assert run(pieces, max_bytes) == expected
    assert run([stream], max_bytes) == expected


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    events, _ = run([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"], 1024)
    assert events == [(b"", b"a\nb")]
    # A lone CR is a line end too, as clients treat it.
    assert run([b"data: a\r\rdata: b\r\r"], 1024)[0] == [(b"", b"a"), (b"", b"b")]


def test_oversized_event_is_dropped_whole_and_the_next_one_survives() -> None:
    huge = b"event: content_block_delta\ndata: " + b"x" * 5000 + b"\ndata: tail-of-the-huge-event\n\n"
    good = b"event: message_delta\ndata: {}\n\n"
    events, dropped = run([huge[:100], huge[100:3000], huge[3000:], good], 1000)
    assert events == [(b"message_delta", b"{}")]
    assert dropped == 1


@pytest.mark.timeout(30)
def test_a_huge_line_in_small_chunks_costs_linear_time() -> None:
    """A hostile upstream sending one 8 MB line in 4 KB chunks must not make the
    parser re-copy the growing line on every chunk (that was quadratic: seconds
    of event-loop time for one event)."""
    line = b"data: " + b"y" * (8 << 20) + b"\n\n"
    chunks = [line[i : i + 4096] for i in range(0, len(line), 4096)]
    events: list[tuple[bytes, bytes]] = []
    parser = SSEParser(lambda n, d: events.append((n, d)), max_event_bytes=16 << 20)
    started = time.perf_counter()
    for chunk in chunks:
        parser.feed(chunk)
    elapsed = time.perf_counter() - started
    assert len(events) == 1 and len(events[0][1]) == 8 << 20
    assert elapsed < 1.0, f"{elapsed:.2f}s for one 8 MB line"

    # Beyond the cap, the line is dropped without being held.
    capped = SSEParser(lambda n, d: events.append((n, d)), max_event_bytes=1 << 20)
    for chunk in chunks:
        capped.feed(chunk)
        assert capped._parts_len <= 1 << 20
    capped.close()
    assert capped.oversized == 1 and len(events) == 1


# Text and thinking deltas are read without a JSON decode when their value is
# plain (upstreams/anthropic_messages.py); whatever the text, the result must be
# the decoded value or "decode it in full" (None), never something else.
@settings(max_examples=examples(300), deadline=None)
@given(
    text=st.text(max_size=40),
    kind=st.sampled_from([("text_delta", "text"), ("thinking_delta", "thinking"), ("input_json_delta", "partial_json")]),
    value_last=st.booleans(),
)
@counted("sse: plain delta text equals the decoded value")
def test_plain_delta_text_is_the_decoded_value_or_nothing(text: str, kind: tuple[str, str], value_last: bool) -> None:
    import orjson

    from upstreams.anthropic_messages import _plain_delta_text

    delta_type, field = kind
    delta = {"type": delta_type, field: text} if value_last else {field: text, "type": delta_type}
    data = orjson.dumps({"type": "content_block_delta", "index": 0, "delta": delta})
    fast = _plain_delta_text(data)
    assert fast is None or (fast == text and field != "partial_json")
    if value_last and field != "partial_json" and '"' not in text and "\\" not in text and text.isprintable():
        assert fast == text  # the common case does take the fast path
