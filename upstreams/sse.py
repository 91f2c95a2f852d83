"""Incremental Server-Sent Events parser used for usage accounting only.

The relayed bytes are never modified; this parser watches a copy. It takes
chunks with arbitrary boundaries (mid-line, mid-CRLF, mid-UTF-8), accepts
LF, CRLF and CR-less mixes, and never holds more than ``max_event_bytes``
of one event: an oversized event is dropped and counted, not buffered.
"""

from __future__ import annotations

from collections.abc import Callable

EventHandler = Callable[[bytes, bytes], None]
"""Called with (event name, data) for each complete event; name is b"" when absent."""


class SSEParser:
    __slots__ = ("_on_event", "_pending", "_event", "_data", "_size", "_max", "oversized", "events")

    def __init__(self, on_event: EventHandler, *, max_event_bytes: int = 10 * 1024 * 1024) -> None:
        self._on_event = on_event
        self._pending = b""
        self._event = b""
        self._data: list[bytes] = []
        self._size = 0
        self._max = max_event_bytes
        self.oversized = 0
        self.events = 0

    def feed(self, chunk: bytes) -> None:
        if self._pending:
            chunk = self._pending + chunk
        lines = chunk.split(b"\n")
        self._pending = lines.pop()
        if len(self._pending) > self._max:
            # A single line longer than any event may be: drop it and everything
            # up to the next line break.
            self._pending = b""
            self._discard_event()
        for line in lines:
            self._line(line[:-1] if line.endswith(b"\r") else line)

    def close(self) -> None:
        """End of stream: a final event without its blank line still counts."""
        if self._pending:
            line = self._pending
            self._pending = b""
            self._line(line[:-1] if line.endswith(b"\r") else line)
        if self._data:
            self._dispatch()

    def _line(self, line: bytes) -> None:
        if not line:
            if self._data:
                self._dispatch()
            else:
                self._event = b""
            return
        if line[0] == 0x3A:  # ":" comment / keep-alive
            return
        name, _, value = line.partition(b":")
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
        self.oversized += 1
        self._data = []
        self._event = b""
        self._size = 0
