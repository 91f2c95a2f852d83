"""Event sinks: where delivered batches end up.

Every ``write_batch`` blocks (the logger runs it in an executor) and
raises on any failure, so the logger can retry, spill and replay.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import TextIO

from conf.model import EventsConfig
from telemetry.events import Event, EventSink

log = logging.getLogger(__name__)

# How much of the JSONL file's tail is read back at start to find events a
# crash delivered without acknowledging (see JsonlSink.recent_event_ids).
JSONL_TAIL_BYTES = 8 << 20


class JsonlSink:
    """One JSON object per line (``Event.to_row()``), appended to a file.

    Each batch is one ``os.write`` on an ``O_APPEND`` descriptor, so
    several gateway processes can share the file without interleaving
    lines.
    """

    name = "jsonl"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._repair_tail()

    def _repair_tail(self) -> None:
        """Drop a torn last line left by a crash mid-write.

        Its events were never acknowledged, so replay writes them again.
        """
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            step = 64 << 10
            pos = size
            while pos > 0:
                start = max(0, pos - step)
                f.seek(start)
                chunk = f.read(pos - start)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    f.truncate(start + nl + 1)
                    return
                pos = start
            f.truncate(0)

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return self._fd

    def write_batch(self, events: list[Event]) -> None:
        if not events:
            return
        data = b"".join(e.to_json_line() for e in events)
        with self._lock:
            fd = self._descriptor()
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")

    def recent_event_ids(self, max_bytes: int = JSONL_TAIL_BYTES) -> set[str]:
        """The ``event_id`` of the lines in the file's last ``max_bytes``.

        A crash between writing a batch and acknowledging it in the spool
        leaves those events both here and in the spool; the logger
        subtracts this set when it replays leftovers, which makes replay
        into this sink exactly-once.
        """
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return set()
        ids: set[str] = set()
        marker = b'"event_id":"'
        with open(self.path, "rb") as f:
            start = max(0, size - max_bytes)
            f.seek(start)
            data = f.read()
        lines = data.split(b"\n")
        if start > 0:
            lines = lines[1:]  # first line is probably partial
        for line in lines:
            at = line.rfind(marker)
            if at < 0:
                continue
            end = line.find(b'"', at + len(marker))
            if end > 0:
                ids.add(line[at + len(marker) : end].decode())
        return ids

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class StdoutSink:
    """One JSON line per event on stdout (or another text stream)."""

    name = "stdout"

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def write_batch(self, events: list[Event]) -> None:
        if not events:
            return
        text = b"".join(e.to_json_line() for e in events).decode()
        stream = self._stream or sys.stdout
        with self._lock:
            stream.write(text)
            stream.flush()

    def close(self) -> None:
        stream = self._stream or sys.stdout
        with self._lock:
            stream.flush()


def resolve(base_dir: str, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else Path(base_dir) / path


def build_sink(config: EventsConfig, base_dir: str) -> EventSink:
    kind = config.resolved_sink
    if kind == "jsonl":
        return JsonlSink(resolve(base_dir, config.file))
    if kind == "stdout":
        return StdoutSink()
    if kind == "bigquery":
        raise NotImplementedError("the BigQuery event sink is not wired yet")
    raise ValueError(f"unknown event sink {kind!r}")
