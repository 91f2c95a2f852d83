"""Incremental Server-Sent Events parser used for usage accounting only.

The relayed bytes are never modified; this parser watches a copy. It takes
chunks with arbitrary boundaries (mid-line, mid-CRLF, mid-UTF-8) and the
three line endings the SSE format allows (LF, CRLF and a lone CR, mixed
freely), so it splits a stream exactly as a client does. It never holds
more than ``max_event_bytes`` of one event: a line longer than that, or an
event whose data adds up to more, is dropped up to the next blank line and
counted in ``oversized``, not buffered. Work per chunk is linear in the
chunk's size, however long the line it continues.

A line that is not SSE -- not blank, not a ``:`` comment, and not one of the
format's fields (``data``, ``event``, ``id``, ``retry``, with or without a
``:`` value) -- is counted in ``not_sse``. It is recognised from its first
bytes, before the line ends, so a body that is not SSE at all (HTML, JSON, a
compressed stream) is reported on its first chunk, not after 10 MB. The
first violation of either kind is described in ``protocol_error``; events
are parsed exactly as before (the format says unknown fields are ignored),
the caller decides to stop.
"""

from __future__ import annotations

from collections.abc import Callable

EventHandler = Callable[[bytes, bytes], None]
"""Called with (event name, data) for each complete event; name is b"" when absent."""

_LF = b"\n"
_CR = b"\r"
_BLANK = b"\n\n"
_FIELDS = frozenset({b"data", b"event", b"id", b"retry"})
# What a line that is SSE can start with; a line's first _PREFIX bytes decide.
_STARTS = (b"data:", b"event:", b"id:", b"retry:")
_PREFIX = 6
NOT_SSE = "data that is not Server-Sent Events"
OVERSIZED = "an event larger than the gateway accepts"


def _could_start_sse(prefix: bytes) -> bool:
    """Whether a line beginning with ``prefix`` (its first bytes, at most _PREFIX) can be SSE."""
    if prefix[:1] == b":":
        return True
    return any(start.startswith(prefix) or prefix.startswith(start) for start in _STARTS)


class SSEParser:
    __slots__ = (
        "_after_cr", "_data", "_event", "_max", "_on_event", "_parts", "_parts_len", "_size",
        "_skip_event", "_skip_line", "events", "not_sse", "oversized", "protocol_error",
    )

    def __init__(self, on_event: EventHandler, *, max_event_bytes: int = 10 * 1024 * 1024) -> None:
        self._on_event = on_event
        # The current, unterminated line, kept in pieces so that a long line
        # arriving in many small chunks is joined once, not once per chunk.
        self._parts: list[bytes] = []
        self._parts_len = 0
        # The previous chunk ended with CR: an LF starting this one completes a CRLF.
        self._after_cr = False
        # Dropping the rest of an over-long line / of an oversized event.
        self._skip_line = False
        self._skip_event = False
        self._event = b""
        self._data: list[bytes] = []
        self._size = 0
        self._max = max_event_bytes
        self.oversized = 0
        self.events = 0
        self.not_sse = 0
        self.protocol_error: str | None = None

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._after_cr:
            self._after_cr = False
            if chunk[:1] == _LF:
                chunk = chunk[1:]
                if not chunk:
                    return
        if _CR in chunk:
            self._after_cr = chunk[-1:] == _CR
            chunk = chunk.replace(b"\r\n", _LF).replace(_CR, _LF)
        if self._parts or self._data or self._event or self._skip_line or self._skip_event:
            # The chunk goes on an event the last one cut: finish that event line
            # by line, then the rest is between events again (curl's chunks
            # cut an event nearly every time, so this keeps the fast path below
            # for all but one event per chunk).
            chunk = self._finish_pending(chunk)
        if not (self._parts or self._data or self._event or self._skip_line or self._skip_event):
            # Between events (the usual state: providers write whole events):
            # everything up to the last blank line goes event by event.
            end = chunk.rfind(_BLANK)
            if end >= 0:
                self._events(chunk[:end])
                chunk = chunk[end + 2 :]
                if not chunk:
                    return
        lines = chunk.split(_LF)
        tail = lines.pop()
        if lines:
            self._end_line(lines[0])
            for line in lines[1:]:
                self._line(line)
        if tail and not self._skip_line:
            if self._parts_len < _PREFIX and not self._skip_event and self.protocol_error is None:
                # A line is known not to be SSE from its first bytes: say so now,
                # not when (if ever) it ends.
                prefix = (b"".join(self._parts) + tail[:_PREFIX])[:_PREFIX] if self._parts else tail[:_PREFIX]
                if not _could_start_sse(prefix):
                    self.protocol_error = NOT_SSE
            if self._parts_len + len(tail) > self._max:
                # This line is already longer than any event may be.
                self._parts = []
                self._parts_len = 0
                self._skip_line = True
                self._discard_event()
            else:
                self._parts.append(tail)
                self._parts_len += len(tail)

    def _finish_pending(self, chunk: bytes) -> bytes:
        """Feed ``chunk``'s whole lines until the event in progress has ended; the rest of it."""
        start = 0
        while self._parts or self._data or self._event or self._skip_line or self._skip_event:
            end = chunk.find(_LF, start)
            if end < 0:
                break
            self._end_line(chunk[start:end])
            start = end + 1
        return chunk[start:] if start else chunk

    def _end_line(self, line: bytes) -> None:
        """A line's end arrived: join what earlier chunks held of it, then parse it."""
        if self._parts:
            self._parts.append(line)
            line = b"".join(self._parts)
            self._parts = []
            self._parts_len = 0
        if self._skip_line:
            # The rest of a line already dropped as too long.
            self._skip_line = False
        else:
            self._line(line)

    def _events(self, head: bytes) -> None:
        """Whole events, each followed by a blank line; the state is clean before each.

        The two shapes providers send (``data:`` alone, or ``event:`` then
        ``data:``) are dispatched without going line by line; anything else
        (comments, ids, several data lines, oversized) takes the general path,
        so the result is the same as feeding the lines one by one.
        """
        on_event = self._on_event
        for block in head.split(_BLANK):
            if len(block) <= self._max:
                if block.startswith(b"data: "):
                    if _LF not in block:
                        self.events += 1
                        on_event(b"", block[6:])
                        continue
                elif block.startswith(b"event: "):
                    nl = block.find(_LF)
                    if nl > 0 and block.startswith(b"data: ", nl + 1) and block.find(_LF, nl + 1) < 0:
                        self.events += 1
                        on_event(block[7:nl].strip(), block[nl + 7 :])
                        continue
            for line in block.split(_LF):
                self._line(line)
            self._line(b"")

    def close(self) -> None:
        """End of stream: a final event without its blank line still counts."""
        if self._parts:
            line = b"".join(self._parts)
            self._parts = []
            self._parts_len = 0
            self._line(line)
        self._skip_line = False
        if self._data and not self._skip_event:
            self._dispatch()

    def _line(self, line: bytes) -> None:
        if not line:
            if self._skip_event:
                self._skip_event = False
            elif self._data:
                self._dispatch()
                return
            self._event = b""
            return
        if self._skip_event:
            return
        if len(line) > self._max:
            self._discard_event()
            return
        if line[0] == 0x3A:  # ":" comment / keep-alive
            return
        name, _, value = line.partition(b":")
        if name not in _FIELDS:
            self.not_sse += 1
            if self.protocol_error is None:
                self.protocol_error = NOT_SSE
            return
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._size += len(value)
            if self._size > self._max:
                self._discard_event()
                return
            self._data.append(value)
        elif name == b"event":
            self._event = value.strip()

    def _dispatch(self) -> None:
        data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        event = self._event
        self._data = []
        self._event = b""
        self._size = 0
        self.events += 1
        self._on_event(event, data)

    def _discard_event(self) -> None:
        """Drop the event being read, and everything up to the blank line that ends it."""
        if not self._skip_event:
            self.oversized += 1
            if self.protocol_error is None:
                self.protocol_error = OVERSIZED
        self._skip_event = True
        self._data = []
        self._event = b""
        self._size = 0
