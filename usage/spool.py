"""Local durability for usage events: journal segments and spill files.

Every event is written to exactly one *log* (an append-only file of JSON
lines, ``Event.to_json_line()``) before anything else happens to it.  Each
log has a sibling ``.acks`` file listing the ``event_id`` of every event
that no longer needs the log (delivered to the sink, or copied into a
fsynced spill file).  A log is deleted only once every event in it is
acknowledged, so after a crash the unacknowledged lines of the surviving
logs are exactly what still has to reach the sink.

Two kinds of log share this format:

* ``journal-*.jsonl``: the hot-path journal.  ``append`` is one
  ``os.write`` on an ``O_APPEND`` descriptor: the line is in the kernel's
  page cache when ``record()`` returns, so SIGKILL of the process cannot
  lose it (a power cut can; that is the price of no fsync per event).
* ``spill-*.jsonl``: written in one go from memory, then fsynced, when a
  batch cannot be delivered in time or the in-memory buffer is full.

Several gateway processes may share one ``spool_dir``: each takes an
exclusive ``flock`` on a numbered slot and keeps its files in that slot's
directory.  On start a process also adopts the files of slots nobody
holds (a process count that went down), so no log is orphaned.

All methods do blocking file I/O: call them from an executor, except
``append`` (one small write, cheap enough for the event loop) and the
constructor (called once at startup).
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from usage.events import Event

log = logging.getLogger(__name__)

JOURNAL_PREFIX = "journal-"
SPILL_PREFIX = "spill-"
LOG_SUFFIX = ".jsonl"
ACKS_SUFFIX = ".acks"
MAX_SLOTS = 1024
# Outside the slot directories, so replay never picks it up.
DEAD_LETTER = "rejected.jsonl"


@dataclass(eq=False)
class Log:
    """One log file, its acks file, and the counts the owner keeps for it."""

    path: Path
    fd: int | None = None
    acks_fd: int | None = None
    appended: int = 0
    acked: int = 0
    closed: bool = False
    opened_at: float = field(default_factory=time.monotonic)
    _acks_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def acks_path(self) -> Path:
        return acks_path_for(self.path)

    @property
    def done(self) -> bool:
        return self.closed and self.acked >= self.appended


def acks_path_for(path: Path) -> Path:
    return path.with_name(path.name + ACKS_SUFFIX)


@dataclass
class ReplayCursor:
    """Where the replay of one leftover log stands."""

    path: Path
    acked: set[str]
    offset: int = 0


class Spool:
    def __init__(self, directory: Path) -> None:
        self.root = directory
        self.root.mkdir(parents=True, exist_ok=True)
        self.slot, self._lock_fd = self._take_slot()
        self.dir = self.root / f"slot-{self.slot}"
        self.dir.mkdir(exist_ok=True)
        self._seq = itertools.count()
        self._adopt_orphans()

    # -- slots -----------------------------------------------------------

    def _take_slot(self) -> tuple[int, int]:
        for slot in range(MAX_SLOTS):
            fd = os.open(self.root / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return slot, fd
        raise RuntimeError(f"no free event spool slot under {self.root}")

    def _adopt_orphans(self) -> None:
        """Move the logs of slots no live process holds into our own slot."""
        for lock_path in sorted(self.root.glob("slot-*.lock")):
            slot_name = lock_path.name[: -len(".lock")]
            other_dir = self.root / slot_name
            if other_dir == self.dir or not other_dir.is_dir() or not any(other_dir.iterdir()):
                continue
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                for item in other_dir.iterdir():
                    # Names carry pid and time, so they cannot collide with ours.
                    os.replace(item, self.dir / item.name)
                log.info("adopted event spool files from %s", other_dir)
            finally:
                os.close(fd)

    def release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- writing ---------------------------------------------------------

    def _new_path(self, prefix: str) -> Path:
        return self.dir / f"{prefix}{time.time_ns():020d}-{os.getpid()}-{next(self._seq):06d}{LOG_SUFFIX}"

    def open_journal(self) -> Log:
        path = self._new_path(JOURNAL_PREFIX)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return Log(path=path, fd=fd)

    @staticmethod
    def append(journal: Log, line: bytes) -> None:
        """The hot-path write: one syscall, no fsync."""
        assert journal.fd is not None
        written = os.write(journal.fd, line)
        if written != len(line):  # regular files only short-write on ENOSPC-like trouble
            raise OSError(f"short write to {journal.path}: {written} of {len(line)} bytes")
        journal.appended += 1

    @staticmethod
    def close_log(entry: Log) -> None:
        entry.closed = True
        if entry.fd is not None:
            os.close(entry.fd)
            entry.fd = None

    def write_spill(self, lines: Iterable[bytes]) -> tuple[Path, int]:
        """A new fsynced spill file holding ``lines``; returns its path and line count."""
        data = b"".join(lines)
        count = data.count(b"\n")
        path = self._new_path(SPILL_PREFIX)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        # Rename after fsync so a crash never leaves a half-written spill under its real name.
        os.replace(tmp, path)
        self._fsync_dir()
        return path, count

    def dead_letter(self, lines: Iterable[bytes]) -> Path:
        """Append events the sink refuses for good to ``rejected.jsonl`` (never replayed)."""
        path = self.root / DEAD_LETTER
        data = b"".join(lines)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def ack(entry: Log | Path, event_ids: Iterable[str]) -> None:
        """Record that these events no longer need the log (thread-safe)."""
        data = "".join(f"{i}\n" for i in event_ids).encode()
        if not data:
            return
        if isinstance(entry, Path):
            fd = os.open(acks_path_for(entry), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            return
        with entry._acks_lock:
            if entry.acks_fd is None:
                entry.acks_fd = os.open(entry.acks_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(entry.acks_fd, data)

    @staticmethod
    def delete(entry: Log | Path) -> None:
        if isinstance(entry, Log):
            with entry._acks_lock:
                if entry.acks_fd is not None:
                    os.close(entry.acks_fd)
                    entry.acks_fd = None
            if entry.fd is not None:
                os.close(entry.fd)
                entry.fd = None
            path = entry.path
        else:
            path = entry
        # The log goes first: an acks file without its log is harmless and swept later.
        path.unlink(missing_ok=True)
        acks_path_for(path).unlink(missing_ok=True)

    # -- reading back ----------------------------------------------------

    def leftovers(self) -> list[Path]:
        """Logs left by earlier runs (and adopted slots), oldest first; sweeps debris."""
        logs: list[Path] = []
        for item in self.dir.iterdir():
            name = item.name
            if name.endswith(".tmp"):
                item.unlink(missing_ok=True)  # a spill that never got its fsync+rename
            elif name.endswith(ACKS_SUFFIX):
                if not item.with_name(name[: -len(ACKS_SUFFIX)]).exists():
                    item.unlink(missing_ok=True)
            elif name.endswith(LOG_SUFFIX):
                logs.append(item)
        # Names start with prefix + nanosecond time: order by the time part across both kinds.
        return sorted(logs, key=lambda p: p.name.split("-", 1)[1])

    @staticmethod
    def open_cursor(path: Path) -> ReplayCursor:
        acked: set[str] = set()
        try:
            with open(acks_path_for(path), "rb") as f:
                acked = {line.strip().decode() for line in f if line.strip()}
        except FileNotFoundError:
            pass
        return ReplayCursor(path=path, acked=acked)

    @staticmethod
    def read_batch(cursor: ReplayCursor, limit: int) -> tuple[list[Event], int, int, bool]:
        """Up to ``limit`` unacknowledged events from the cursor's position.

        Returns ``(events, next_offset, unreadable, eof)``; the caller
        advances ``cursor.offset`` only once the events are delivered.
        Malformed lines, and a torn last line (a write cut short by a power
        loss), are counted as unreadable and skipped.
        """
        events: list[Event] = []
        unreadable = 0
        eof = False
        offset = cursor.offset
        with open(cursor.path, "rb") as f:
            f.seek(offset)
            while len(events) < limit:
                line = f.readline()
                if not line:
                    eof = True
                    break
                offset += len(line)
                try:
                    if not line.endswith(b"\n"):
                        raise ValueError("torn line")
                    event = Event.from_row(orjson.loads(line))
                except (ValueError, KeyError, TypeError):
                    unreadable += 1
                    continue
                if event.event_id in cursor.acked:
                    continue
                events.append(event)
            else:
                # Full batch: peek whether anything follows, so the last batch closes the file.
                eof = not f.read(1)
        return events, offset, unreadable, eof
