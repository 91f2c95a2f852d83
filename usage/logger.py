"""The usage-event pipeline: journal, bounded buffer, batched flushes, spill, replay.

Life of an event (see docs/events.md for the operator's view):

1. ``record()`` (on the IOLoop, never blocks, never raises) normalises the
   event, appends its JSON line to the current journal segment with one
   ``os.write`` (no fsync), and queues it in memory.  From here on a
   SIGKILL cannot lose it: the journal survives in the page cache.
2. A ``PeriodicCallback`` (and a nudge when a batch fills up) takes batches
   off the queue by size or age and runs ``sink.write_batch`` in a private
   thread pool.  After a success the batch's ids are appended to the
   journal segment's acks file; a segment whose events are all
   acknowledged is deleted.
3. A failed flush is retried with exponential backoff; while the sink is
   failing only one batch is in flight.  A batch that cannot be delivered
   within ``spill_after_s``, events that do not fit in the buffer, and
   whatever is left at shutdown are written to a fsynced spill file (and
   acknowledged in the journal).
4. Spill files, and journal segments left by an earlier run, are replayed
   in the background whenever the sink is healthy, skipping acknowledged
   ids; replay acknowledges as it goes, so a crash mid-replay does not
   deliver anything twice.

Exactly-once: BigQuery rows carry ``event_id`` as insertId, which absorbs
the one window left (a crash after a batch is written but before its
acks are); the JSONL sink closes that window by reading back the ids at
the tail of its file before replaying leftovers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.locks import Condition
from tornado.locks import Event as TornadoEvent

from background import BackgroundTasks
from conf.model import EventsConfig
from usage.events import Event, EventSink
from usage.sinks import RejectedRows
from usage.spool import Log, ReplayCursor, Spool

log = logging.getLogger(__name__)

UNKNOWN_IDENTIFIER = "unknown"
# Metadata keys the reference's BigQuery logger injects into every event.
ACTOR_KEY = "sg.actor"
TRACE_ID_KEY = "trace_id"
# X-Sourcegraph-Interaction-ID, when the client sent one.
INTERACTION_ID_KEY = "interaction_id"


def with_request_context(
    event: Event,
    *,
    actor_uid: str | int | None = None,
    anonymous_uid: str | None = None,
    trace_id: str | None = None,
    interaction_id: str = "",
) -> Event:
    """The event with the reference's injected keys (section 6.1).

    ``sg.actor`` is the Sourcegraph user behind the calling instance (from
    ``X-Sourcegraph-Actor-UID`` / ``-Anonymous-UID``), shaped like the
    platform actor's JSON (``{"UID": int, "AnonymousUID": str}``, empty
    members omitted); ``trace_id`` is the request's trace id.  As in the
    reference, the injected keys overwrite same-named keys of the event.
    """
    metadata = dict(event.metadata)
    actor: dict[str, Any] = {}
    if actor_uid not in (None, "", 0, "0"):
        try:
            uid = int(actor_uid)
        except (TypeError, ValueError):
            uid = None
        # The platform's user ids are 32-bit; anything else a client sends is not one.
        if uid is not None and 0 < uid < 2**31:
            actor["UID"] = uid
    if anonymous_uid:
        actor["AnonymousUID"] = anonymous_uid
    metadata[ACTOR_KEY] = actor
    metadata[TRACE_ID_KEY] = trace_id or ""
    if interaction_id:
        metadata[INTERACTION_ID_KEY] = interaction_id
    # Not dataclasses.replace: it inspects the fields on every call (this runs per request).
    return Event(event.name, event.source, event.identifier, metadata, event.created_at, event.event_id)


def _plain(metadata: Mapping[str, Any]) -> dict[str, Any]:
    try:
        encoded = orjson.dumps(dict(metadata), default=str, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        # orjson has no fallback for integers beyond 64 bits: spell them out.
        encoded = orjson.dumps(_big_ints_as_text(dict(metadata)), default=str, option=orjson.OPT_NON_STR_KEYS)
    return dict(orjson.loads(encoded))


def _big_ints_as_text(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return str(value)
    if isinstance(value, Mapping):
        return {k: _big_ints_as_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_big_ints_as_text(v) for v in value]
    return value


@dataclass(slots=True)
class _Entry:
    event: Event
    line: bytes
    journal: Log | None  # the segment holding its durable copy (None if that write failed)
    queued_at: float


class EventLogger:
    """The gateway's ``EventRecorder``: durable, batched, bounded."""

    def __init__(
        self,
        config: EventsConfig,
        sink: EventSink,
        *,
        base_dir: str,
        max_inflight: int = 4,
        retry_base_s: float = 0.2,
        retry_max_s: float = 5.0,
        spill_after_s: float = 10.0,
        journal_segment_events: int = 10_000,
        journal_segment_age_s: float = 30.0,
    ) -> None:
        self.config = config
        self.sink = sink
        self._buffer_size = config.buffer_size
        self._batch_size = config.batch_size
        self._flush_interval_s = config.flush_interval_ms / 1000
        self._max_inflight = max(1, max_inflight)
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s
        self._spill_after_s = spill_after_s
        self._segment_events = journal_segment_events
        self._segment_age_s = journal_segment_age_s

        spool_dir = Path(config.spool_dir)
        if not spool_dir.is_absolute():
            spool_dir = Path(base_dir) / spool_dir
        self._spool = Spool(spool_dir)
        self._leftovers: deque[Path] = deque(self._spool.leftovers())
        self._journal: Log | None = self._spool.open_journal()
        self._segments: list[Log] = [self._journal]

        self._queue: deque[_Entry] = deque()
        self._overflow: list[_Entry] = []
        self._cursor: ReplayCursor | None = None
        self._known_delivered: set[str] = set()
        self._replay_ready = not self._leftovers
        self._replaying = False
        self._spilling = 0
        self._overflow_spilling = False
        self._inflight_batches = 0
        self._inflight_events = 0
        self._healthy = True
        self._failures_in_row = 0
        self._backoff_until = 0.0
        self._kick_scheduled = False
        self._draining = False
        self._stopping = False
        self._stopped = False
        self._stop_requested = TornadoEvent()
        self._changed = Condition()
        self._tasks = BackgroundTasks(log, on_done=self._task_done)
        self._loop: IOLoop | None = None
        self._periodic: PeriodicCallback | None = None
        # Disk and sink calls get their own threads so a slow BigQuery never
        # starves the default executor other parts of the gateway use.
        self._executor = ThreadPoolExecutor(
            max_workers=self._max_inflight + 3, thread_name_prefix="events"
        )

        # Counters (monotonic; the lead exports them to Prometheus).
        self.queued = 0  # accepted by record()
        self.delivered = 0  # written to the sink from the live queue
        self.retried = 0  # event re-sends after a failed flush
        self.spilled = 0  # written to a spill file (or journal-only after stop)
        self.replayed = 0  # written to the sink from a spill file or leftover journal
        self.dropped = 0  # lost for good; should stay 0
        self.unidentified = 0  # events whose empty identifier became "unknown"
        self.flush_failures = 0  # failed write_batch calls
        self.journal_errors = 0  # journal appends that failed (event kept in memory only)
        self.coerced = 0  # events whose metadata needed str() for some values
        self.rejected = 0  # refused by the sink for good; kept in spool_dir/rejected.jsonl

    # -- public API -------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Events accepted but not yet delivered or spilled."""
        return len(self._queue) + len(self._overflow) + self._inflight_events

    @property
    def pending_replay(self) -> int:
        """Spill files and leftover journal segments still to replay."""
        return len(self._leftovers)

    @property
    def healthy(self) -> bool:
        """False while the sink's last flush failed (for /-/healthz)."""
        return self._healthy

    def stats(self) -> dict[str, int]:
        return {
            "queued": self.queued,
            "delivered": self.delivered,
            "retried": self.retried,
            "spilled": self.spilled,
            "replayed": self.replayed,
            "dropped": self.dropped,
            "unidentified": self.unidentified,
            "flush_failures": self.flush_failures,
            "journal_errors": self.journal_errors,
            "coerced": self.coerced,
            "rejected": self.rejected,
            "backlog": self.backlog,
            "pending_replay": self.pending_replay,
        }

    def record(self, event: Event) -> None:
        """Journal and queue one event. Call on the IOLoop thread."""
        try:
            self._record(event)
        except Exception:  # record() must never raise into a handler
            self.dropped += 1
            log.exception("failed to record usage event")

    def start(self) -> None:
        """Start flushing; call on the running IOLoop."""
        if self._periodic is not None:
            return
        self._loop = IOLoop.current()
        tick_ms = max(10.0, min(self._flush_interval_s * 1000 / 2, 250.0))
        self._periodic = PeriodicCallback(self._pump, tick_ms)
        self._periodic.start()
        if not self._replay_ready:
            self._spawn(self._prepare_replay())
        self._pump()

    async def stop(self, timeout_s: float) -> None:
        """Deliver what the sink takes within ``timeout_s``, spill the rest."""
        if self._stopped or self._stopping:
            return
        deadline = time.monotonic() + max(0.0, timeout_s)
        # Keep a slice of the budget for the spill, which is local and quick.
        deliver_until = deadline - min(1.0, timeout_s * 0.2)
        self._draining = True
        if self._loop is None:
            self._loop = IOLoop.current()
        while time.monotonic() < deliver_until:
            self._pump()
            if not self._queue and not self._overflow and self._live_inflight() == 0:
                break
            if not self._healthy:
                break  # the sink is failing: do not wait out backoffs, spill instead
            await self._changed.wait(timeout=dt.timedelta(seconds=max(0.01, deliver_until - time.monotonic())))
        self._stopping = True
        self._stop_requested.set()  # retrying batches spill instead of sleeping
        if self._periodic is not None:
            self._periodic.stop()
        remaining = self._take_all_queued()
        if remaining:
            await self._spill(remaining, reason="shutdown")
        while (self._spilling or self._inflight_batches) and time.monotonic() < deadline:
            await self._changed.wait(timeout=dt.timedelta(seconds=max(0.01, deadline - time.monotonic())))
        if self._live_inflight():
            # Slow flushes still running: their events stay unacknowledged in
            # the journal and are replayed by the next start.
            log.warning("event sink still busy at shutdown; %d events left in the journal", self._inflight_events)
        self._stopped = True
        await self._close_journal()
        if self._inflight_batches == 0:
            await self._run(self._close_sink)
        self._executor.shutdown(wait=False)
        self._spool.release()
        log.info("event logger stopped: %s", self.stats())

    # -- recording --------------------------------------------------------

    def _record(self, event: Event) -> None:
        event = self._normalise(event)
        try:
            line = event.to_json_line()
        except TypeError:
            # Metadata orjson cannot encode (a set, a custom object): keep
            # the event with those values as strings rather than lose it.
            event = dataclasses.replace(event, metadata=_plain(event.metadata))
            line = event.to_json_line()
            self.coerced += 1
        journal = self._journal
        if journal is None:
            # Recorded after stop(): journal only; the next start replays it.
            journal = self._journal = self._spool.open_journal()
        try:
            self._spool.append(journal, line)
        except OSError as exc:
            self.journal_errors += 1
            if self.journal_errors in (1, 10, 100) or self.journal_errors % 1000 == 0:
                log.error("event journal append failed (%d so far); events kept in memory only: %s", self.journal_errors, exc)
            journal_used: Log | None = None
        else:
            journal_used = journal
        self.queued += 1
        if self._stopping:
            # Past the final flush: the journal is this event's spill; the
            # next start replays it.
            if journal_used is None:
                self.dropped += 1
            else:
                self.spilled += 1
            return
        entry = _Entry(event, line, journal_used, time.monotonic())
        if len(self._queue) < self._buffer_size:
            self._queue.append(entry)
            if len(self._queue) >= self._batch_size:
                self._kick()
        else:
            self._overflow.append(entry)
            if len(self._overflow) >= self._batch_size:
                self._kick()

    def _normalise(self, event: Event) -> Event:
        # The reference's BigQuery logger silently discards events with an
        # empty identifier; we keep them under "unknown" and count them.
        identifier = event.identifier
        if not identifier:
            identifier = UNKNOWN_IDENTIFIER
            self.unidentified += 1
        # A copy, so a caller changing its dict after record() cannot make the
        # delivered row differ from the journaled one.
        metadata = dict(event.metadata) if isinstance(event.metadata, Mapping) else {}
        return Event(
            event.name or UNKNOWN_IDENTIFIER,
            event.source or UNKNOWN_IDENTIFIER,
            identifier,
            metadata,
            event.created_at,
            event.event_id,
        )

    def _kick(self) -> None:
        if self._kick_scheduled or self._loop is None:
            return
        self._kick_scheduled = True
        self._loop.add_callback(self._kicked)

    def _kicked(self) -> None:
        self._kick_scheduled = False
        self._pump()

    # -- scheduling -------------------------------------------------------

    def _capacity(self) -> int:
        return self._max_inflight if self._healthy else 1

    def _live_inflight(self) -> int:
        return self._inflight_batches - (1 if self._replaying else 0)

    def _pump(self) -> None:
        if self._stopped or self._stopping:
            return
        try:
            now = time.monotonic()
            if self._draining and self._overflow:
                # Shutting down: the buffer bound no longer matters, deliver them.
                self._queue.extend(self._overflow)
                self._overflow = []
            while self._queue and self._inflight_batches < self._capacity() and now >= self._backoff_until:
                due = (
                    self._draining
                    or len(self._queue) >= self._batch_size
                    or now - self._queue[0].queued_at >= self._flush_interval_s
                )
                if not due:
                    break
                take = min(self._batch_size, len(self._queue))
                batch = [self._queue.popleft() for _ in range(take)]
                # Count at spawn time, so stop() sees work that has not started yet.
                self._inflight_batches += 1
                self._inflight_events += len(batch)
                self._spawn(self._deliver(batch))
            if self._overflow and not self._overflow_spilling and (
                len(self._overflow) >= self._batch_size
                or now - self._overflow[0].queued_at >= self._flush_interval_s
            ):
                # Batched like flushes, one at a time: a spill file per event
                # would cost an fsync each.
                batch, self._overflow = self._overflow, []
                self._spilling += 1
                self._overflow_spilling = True
                self._spawn(self._spill_overflow(batch))
            if (
                self._leftovers
                and self._replay_ready
                and not self._replaying
                and not self._draining
                and self._healthy
                and now >= self._backoff_until
                and self._inflight_batches < self._capacity()
                and len(self._queue) < self._batch_size
            ):
                self._replaying = True
                self._inflight_batches += 1
                self._spawn(self._replay_step())
            self._maintain_journal(now)
        except Exception:  # a periodic callback must keep running
            log.exception("event pump failed")

    def _spawn(self, work: Awaitable[Any]) -> None:
        self._tasks.spawn(work, "event pipeline task")

    def _task_done(self) -> None:
        self._changed.notify_all()
        if not self._stopping:
            self._kick()

    def _run(self, fn: Any, *args: Any) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- delivery ---------------------------------------------------------

    async def _deliver(self, batch: list[_Entry]) -> None:
        """Write one live batch (the caller has counted it in flight)."""
        started = time.monotonic()
        attempt = 0
        counted = len(batch)  # in flight; batch may shrink if the sink rejects rows
        try:
            while True:
                try:
                    await self._run(self._write_live, batch)
                except Exception as exc:  # any sink failure is retried
                    refused = exc.event_ids if isinstance(exc, RejectedRows) else set()
                    poisoned = [e for e in batch if e.event.event_id in refused]
                    if poisoned:
                        await self._set_aside(poisoned, exc)
                        batch = [e for e in batch if e.event.event_id not in refused]
                        if not batch:
                            return
                        continue  # the rest only failed alongside them: resend now
                    attempt += 1
                    self._note_failure(exc)
                    if self._stopping or time.monotonic() - started >= self._spill_after_s:
                        await self._spill(batch, reason="sink unavailable")
                        return
                    self.retried += len(batch)
                    await self._sleep(self._retry_delay(attempt))
                    continue
                self.delivered += len(batch)
                self._note_success()
                self._note_acked(batch)
                return
        finally:
            self._inflight_batches -= 1
            self._inflight_events -= counted

    async def _sleep(self, seconds: float) -> None:
        """Back off, but wake at once when stop() begins."""
        try:
            await self._stop_requested.wait(timeout=dt.timedelta(seconds=seconds))
        except TimeoutError:
            pass

    async def _set_aside(self, poisoned: list[_Entry], exc: Exception) -> None:
        """Dead-letter events the sink refuses for good, so they stop blocking the rest."""
        try:
            await self._run(self._write_dead_letter, poisoned)
        except Exception:
            # Stay in the journal for the next start rather than vanish.
            log.exception("could not set aside %d rejected events", len(poisoned))
            return
        self.rejected += len(poisoned)
        self._note_acked(poisoned)
        log.error("sink refused %d events for good, kept in %s: %s", len(poisoned), self._spool.root / "rejected.jsonl", exc)

    def _write_dead_letter(self, batch: list[_Entry]) -> None:
        self._spool.dead_letter(e.line for e in batch)
        self._ack_journals(batch)

    def _write_live(self, batch: list[_Entry]) -> None:
        write_lines = getattr(self.sink, "write_lines", None)
        if write_lines is not None:
            write_lines([e.line for e in batch])
        else:
            self.sink.write_batch([e.event for e in batch])
        self._ack_journals(batch)

    def _ack_journals(self, batch: list[_Entry]) -> None:
        by_journal: dict[int, tuple[Log, list[str]]] = {}
        for e in batch:
            if e.journal is not None:
                by_journal.setdefault(id(e.journal), (e.journal, []))[1].append(e.event.event_id)
        for journal, ids in by_journal.values():
            try:
                self._spool.ack(journal, ids)
            except OSError:
                # Delivered but not acknowledged: a later replay may resend
                # these (BigQuery dedupes by insertId).
                log.exception("failed to acknowledge delivered events in %s", journal.path)

    @staticmethod
    def _note_acked(batch: list[_Entry]) -> None:
        for e in batch:
            if e.journal is not None:
                e.journal.acked += 1

    def _retry_delay(self, attempt: int) -> float:
        delay: float = min(self._retry_max_s, self._retry_base_s * (2 ** (attempt - 1)))
        return delay * random.uniform(0.5, 1.0)

    def _note_failure(self, exc: BaseException) -> None:
        self.flush_failures += 1
        self._failures_in_row += 1
        if self._healthy or self._failures_in_row in (1, 10, 100) or self._failures_in_row % 1000 == 0:
            log.error("event sink %s failed (%d in a row): %s", getattr(self.sink, "name", "?"), self._failures_in_row, exc)
        self._healthy = False
        self._backoff_until = time.monotonic() + self._retry_delay(self._failures_in_row)
        self._changed.notify_all()  # a stop() waiting for this flush spills instead

    def _note_success(self) -> None:
        if not self._healthy:
            log.info("event sink %s recovered", getattr(self.sink, "name", "?"))
        self._healthy = True
        self._failures_in_row = 0
        self._backoff_until = 0.0

    # -- spilling ---------------------------------------------------------

    async def _spill_overflow(self, batch: list[_Entry]) -> None:
        try:
            await self._spill(batch, reason="buffer full", counted=True)
        finally:
            self._overflow_spilling = False

    async def _spill(self, batch: list[_Entry], *, reason: str, counted: bool = False) -> None:
        """Move ``batch`` to a fsynced spill file (``counted``: the caller already bumped ``_spilling``)."""
        if not counted:
            self._spilling += 1
        try:
            path = await self._run(self._write_spill, batch)
        except Exception:
            # The journal still holds them (unacknowledged, so never deleted):
            # the next start replays them.  Only journal-less events are lost.
            lost = sum(1 for e in batch if e.journal is None)
            self.dropped += lost
            log.exception("event spill failed (%s); %d events left in the journal, %d lost", reason, len(batch) - lost, lost)
            return
        finally:
            self._spilling -= 1
        self.spilled += len(batch)
        self._note_acked(batch)
        self._leftovers.append(path)
        log.warning("spilled %d events (%s) to %s", len(batch), reason, path.name)

    def _write_spill(self, batch: list[_Entry]) -> Path:
        path, _ = self._spool.write_spill(e.line for e in batch)
        self._ack_journals(batch)
        return path

    def _take_all_queued(self) -> list[_Entry]:
        batch = list(self._queue) + self._overflow
        self._queue.clear()
        self._overflow = []
        return batch

    # -- replay -----------------------------------------------------------

    async def _prepare_replay(self) -> None:
        """Learn what the sink already holds, so leftovers replay exactly once."""
        recent = getattr(self.sink, "recent_event_ids", None)
        try:
            if callable(recent):
                self._known_delivered = await self._run(recent)
        except Exception:
            log.exception("could not read back recently delivered event ids")
        finally:
            self._replay_ready = True
        log.info("replaying %d leftover event files", len(self._leftovers))

    async def _replay_step(self) -> None:
        """Replay one batch of the oldest leftover (the caller has counted it in flight)."""
        try:
            if self._cursor is None:
                cursor = await self._run(self._spool.open_cursor, self._leftovers[0])
                cursor.acked |= self._known_delivered
                self._cursor = cursor
            cursor = self._cursor
            events, next_offset, unreadable, eof = await self._run(self._spool.read_batch, cursor, self._batch_size)
            if self._stopping:
                return  # the file stays for the next start
            if events:
                try:
                    await self._run(self._write_replay, events, cursor.path)
                except RejectedRows as exc:
                    poisoned = [e for e in events if e.event_id in exc.event_ids]
                    if not poisoned:
                        self._note_failure(exc)
                        return
                    await self._run(self._dead_letter_replayed, poisoned, cursor.path)
                    cursor.acked.update(e.event_id for e in poisoned)
                    self.rejected += len(poisoned)
                    log.error("sink refused %d replayed events for good: %s", len(poisoned), exc)
                    return  # the next step re-reads this batch without them
                except Exception as exc:
                    self._note_failure(exc)
                    return
                self.replayed += len(events)
                self._note_success()
            if unreadable:
                self.dropped += unreadable
                log.error("%d unreadable lines in %s", unreadable, cursor.path.name)
            cursor.offset = next_offset
            if eof:
                await self._run(self._spool.delete, cursor.path)
                self._cursor = None
                self._leftovers.popleft()
        finally:
            self._inflight_batches -= 1
            self._replaying = False

    def _dead_letter_replayed(self, events: list[Event], path: Path) -> None:
        self._spool.dead_letter(e.to_json_line() for e in events)
        self._spool.ack(path, [e.event_id for e in events])

    def _write_replay(self, events: list[Event], path: Path) -> None:
        self.sink.write_batch(events)
        try:
            self._spool.ack(path, [e.event_id for e in events])
        except OSError:
            log.exception("failed to acknowledge replayed events in %s", path)

    # -- journal housekeeping ---------------------------------------------

    def _maintain_journal(self, now: float) -> None:
        journal = self._journal
        if journal is not None and (
            journal.appended >= self._segment_events
            or (journal.appended and now - journal.opened_at >= self._segment_age_s)
        ):
            self._spool.close_log(journal)
            self._journal = self._spool.open_journal()
            self._segments.append(self._journal)
        done = [s for s in self._segments if s.done]
        if done:
            self._segments = [s for s in self._segments if not s.done]
            for segment in done:
                self._spawn(self._run(self._spool.delete, segment))

    async def _close_journal(self) -> None:
        journal, self._journal = self._journal, None
        if journal is not None:
            self._spool.close_log(journal)
        done = [s for s in self._segments if s.done]
        self._segments = [s for s in self._segments if not s.done]
        for segment in done:
            try:
                await self._run(self._spool.delete, segment)
            except OSError:
                log.exception("could not delete delivered journal segment %s", segment.path)

    def _close_sink(self) -> None:
        try:
            self.sink.close()
        except Exception:
            log.exception("closing the event sink failed")
