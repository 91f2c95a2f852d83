"""EventLogger in-process: JSONL and stdout sinks, buffer bounds, spill and replay, normalisation."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from conf.model import EventsConfig
from usage.events import Event
from usage.logger import EventLogger, with_request_context
from usage.sinks import JsonlSink, StdoutSink, build_sink

pytestmark = pytest.mark.timeout(30)


def events_config(tmp_path: Path, **overrides: Any) -> EventsConfig:
    values: dict[str, Any] = dict(
        sink="jsonl",
        file=str(tmp_path / "events.jsonl"),
        spool_dir=str(tmp_path / "spool"),
        buffer_size=1000,
        batch_size=50,
        flush_interval_ms=20,
        bigquery_project_id="",
        bigquery_dataset="cody_gateway",
        bigquery_table="events",
        bigquery_api_url="",
        bigquery_create_if_missing=True,
    )
    values.update(overrides)
    return EventsConfig(**values)


def make_event(i: int, **kw: Any) -> Event:
    return Event(name="CompletionsFinished", source="dotcom-user", identifier=f"user-{i}", metadata={"i": i}, **kw)


def jsonl_ids(path: Path) -> Counter[str]:
    if not path.exists():
        return Counter()
    return Counter(orjson.loads(line)["event_id"] for line in path.read_bytes().splitlines() if line)


def spool_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "spool").rglob("*") if p.is_file() and not p.name.endswith(".lock"))


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


class FlakySink:
    """A real JSONL sink behind a switch, for failure paths."""

    name = "flaky"

    def __init__(self, path: Path) -> None:
        self.inner = JsonlSink(path)
        self.failing = False
        self.calls = 0

    def write_batch(self, events: list[Event]) -> None:
        self.calls += 1
        if self.failing:
            raise ConnectionError("sink down (test)")
        self.inner.write_batch(events)

    def close(self) -> None:
        self.inner.close()


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_normal_run_delivers_every_event_once_and_cleans_the_journal(tmp_path: Path) -> None:
    config = events_config(tmp_path)

    async def main() -> EventLogger:
        logger = EventLogger(config, build_sink(config, str(tmp_path)), base_dir=str(tmp_path))
        logger.start()
        for i in range(700):
            logger.record(make_event(i))
            if i % 100 == 0:
                await asyncio.sleep(0)
        await wait_until(lambda: logger.delivered == 700)
        await logger.stop(5)
        return logger

    logger = run(main())
    ids = jsonl_ids(tmp_path / "events.jsonl")
    assert len(ids) == 700 and set(ids.values()) == {1}
    assert logger.stats()["dropped"] == 0 and logger.spilled == 0 and logger.backlog == 0
    assert spool_files(tmp_path) == []  # every journal segment was delivered and deleted


def test_flush_by_age_below_batch_size(tmp_path: Path) -> None:
    config = events_config(tmp_path, batch_size=500, flush_interval_ms=50)

    async def main() -> None:
        logger = EventLogger(config, build_sink(config, str(tmp_path)), base_dir=str(tmp_path))
        logger.start()
        for i in range(3):
            logger.record(make_event(i))
        assert logger.backlog == 3
        await wait_until(lambda: logger.delivered == 3, 5)
        await logger.stop(2)

    run(main())
    assert len(jsonl_ids(tmp_path / "events.jsonl")) == 3


def test_rows_have_the_reference_shape_plus_event_id(tmp_path: Path) -> None:
    config = events_config(tmp_path)

    async def main() -> None:
        logger = EventLogger(config, build_sink(config, str(tmp_path)), base_dir=str(tmp_path))
        logger.start()
        logger.record(Event("RateLimited", "dotcom-user", "u1", {"cause": "quota", "limit": 5}, created_at=0.5))
        await logger.stop(2)

    run(main())
    (row,) = [orjson.loads(line) for line in (tmp_path / "events.jsonl").read_bytes().splitlines()]
    assert list(row) == ["name", "source", "identifier", "metadata", "created_at", "event_id"]
    assert row["created_at"] == "1970-01-01T00:00:00.500000Z"
    assert orjson.loads(row["metadata"]) == {"cause": "quota", "limit": 5}


def test_empty_identifier_is_kept_as_unknown_and_counted(tmp_path: Path) -> None:
    config = events_config(tmp_path)

    async def main() -> EventLogger:
        logger = EventLogger(config, build_sink(config, str(tmp_path)), base_dir=str(tmp_path))
        logger.start()
        logger.record(Event("CompletionsFinished", "anonymous", "", {}))
        logger.record(make_event(1))
        await logger.stop(2)
        return logger

    logger = run(main())
    rows = [orjson.loads(line) for line in (tmp_path / "events.jsonl").read_bytes().splitlines()]
    assert sorted(r["identifier"] for r in rows) == ["unknown", "user-1"]
    assert logger.unidentified == 1 and logger.dropped == 0


def test_unencodable_metadata_is_coerced_not_lost(tmp_path: Path) -> None:
    config = events_config(tmp_path)

    async def main() -> EventLogger:
        logger = EventLogger(config, build_sink(config, str(tmp_path)), base_dir=str(tmp_path))
        logger.start()
        logger.record(Event("CompletionsFinished", "s", "i", {"odd": {1, 2}, "ok": 1}))
        logger.record(Event("CompletionsFinished", "s", "i", {"huge": 2**70, "nested": [{"huge": -(2**70)}]}))
        await logger.stop(2)
        return logger

    logger = run(main())
    rows = [orjson.loads(line) for line in (tmp_path / "events.jsonl").read_bytes().splitlines()]
    assert orjson.loads(rows[0]["metadata"])["ok"] == 1
    assert orjson.loads(rows[1]["metadata"]) == {"huge": str(2**70), "nested": [{"huge": str(-(2**70))}]}
    assert logger.coerced == 2 and logger.dropped == 0


def test_request_context_injection() -> None:
    event = Event("CompletionsFinished", "dotcom-user", "u", {"trace_id": "mine", "model": "m"})
    enriched = with_request_context(event, actor_uid="42", anonymous_uid="anon-1", trace_id="abc")
    assert enriched.metadata == {"trace_id": "abc", "model": "m", "sg.actor": {"UID": 42, "AnonymousUID": "anon-1"}}
    assert enriched.event_id == event.event_id and event.metadata["trace_id"] == "mine"
    bare = with_request_context(event)
    assert bare.metadata["sg.actor"] == {} and bare.metadata["trace_id"] == ""
    # A header value that is no user id (too large, negative, not a number) is not one.
    for uid in ("1" * 30, "-5", "0", "x"):
        assert with_request_context(event, actor_uid=uid).metadata["sg.actor"] == {}


def test_full_buffer_spills_and_replays_exactly_once(tmp_path: Path) -> None:
    config = events_config(tmp_path, buffer_size=100, batch_size=20)

    async def main() -> EventLogger:
        logger = EventLogger(config, build_sink(config, str(tmp_path)), base_dir=str(tmp_path))
        logger.start()
        for i in range(1000):  # one burst, no yield: 900 do not fit in the buffer
            logger.record(make_event(i))
        await wait_until(lambda: logger.delivered + logger.replayed == 1000)
        await logger.stop(5)
        return logger

    logger = run(main())
    assert logger.spilled >= 900 and logger.replayed == logger.spilled and logger.dropped == 0
    ids = jsonl_ids(tmp_path / "events.jsonl")
    assert len(ids) == 1000 and set(ids.values()) == {1}
    assert spool_files(tmp_path) == []


def test_sink_outage_retries_then_spills_then_replays_on_recovery(tmp_path: Path) -> None:
    config = events_config(tmp_path, batch_size=25)
    sink = FlakySink(tmp_path / "events.jsonl")

    async def main() -> EventLogger:
        logger = EventLogger(config, sink, base_dir=str(tmp_path), retry_base_s=0.01, retry_max_s=0.05, spill_after_s=0.3)
        logger.start()
        sink.failing = True
        for i in range(300):
            logger.record(make_event(i))
            if i % 10 == 0:
                await asyncio.sleep(0.005)
        await wait_until(lambda: logger.spilled > 0 and logger.retried > 0)
        assert not logger.healthy
        sink.failing = False
        await wait_until(lambda: logger.delivered + logger.replayed == 300)
        assert logger.healthy
        await logger.stop(5)
        return logger

    logger = run(main())
    ids = jsonl_ids(tmp_path / "events.jsonl")
    assert len(ids) == 300 and set(ids.values()) == {1}
    assert logger.dropped == 0 and logger.pending_replay == 0
    assert spool_files(tmp_path) == []


def test_stop_with_sink_down_spills_and_next_start_replays(tmp_path: Path) -> None:
    config = events_config(tmp_path, batch_size=50, flush_interval_ms=10_000)
    sink = FlakySink(tmp_path / "events.jsonl")
    sink.failing = True

    async def first_run() -> EventLogger:
        logger = EventLogger(config, sink, base_dir=str(tmp_path), retry_base_s=0.01)
        logger.start()
        for i in range(120):
            logger.record(make_event(i))
        started = time.monotonic()
        await logger.stop(1.0)
        assert time.monotonic() - started < 3
        return logger

    first = run(first_run())
    assert first.spilled == 120 and first.delivered == 0 and first.dropped == 0
    assert any(name.startswith("spill-") for name in spool_files(tmp_path))

    async def second_run() -> EventLogger:
        healthy = FlakySink(tmp_path / "events.jsonl")
        logger = EventLogger(config, healthy, base_dir=str(tmp_path))
        logger.start()
        await wait_until(lambda: logger.replayed == 120 and logger.pending_replay == 0)
        await logger.stop(2)
        return logger

    second = run(second_run())
    ids = jsonl_ids(tmp_path / "events.jsonl")
    assert len(ids) == 120 and set(ids.values()) == {1}
    assert second.dropped == 0 and spool_files(tmp_path) == []


def test_leftover_journal_replay_skips_what_the_jsonl_file_already_has(tmp_path: Path) -> None:
    """A crash after a batch reached the file but before its ack: replay must not repeat it."""
    config = events_config(tmp_path)
    spool_dir = tmp_path / "spool" / "slot-0"
    spool_dir.mkdir(parents=True)
    events = [make_event(i) for i in range(10)]
    (spool_dir / "journal-00000000000000000001-1-000000.jsonl").write_bytes(b"".join(e.to_json_line() for e in events))
    (spool_dir / "journal-00000000000000000001-1-000000.jsonl.acks").write_bytes(
        b"".join(e.event_id.encode() + b"\n" for e in events[:3])
    )
    JsonlSink(tmp_path / "events.jsonl").write_batch(events[:6])  # 3..5 delivered but unacknowledged

    async def main() -> EventLogger:
        logger = EventLogger(config, build_sink(config, str(tmp_path)), base_dir=str(tmp_path))
        logger.start()
        await wait_until(lambda: logger.pending_replay == 0)
        await logger.stop(2)
        return logger

    logger = run(main())
    assert logger.replayed == 4
    ids = jsonl_ids(tmp_path / "events.jsonl")
    assert ids == Counter({e.event_id: 1 for e in events})


def test_torn_jsonl_tail_is_repaired_and_replayed(tmp_path: Path) -> None:
    events = [make_event(i) for i in range(3)]
    path = tmp_path / "events.jsonl"
    path.write_bytes(events[0].to_json_line() + events[1].to_json_line()[:20])
    JsonlSink(path).write_batch([events[2]])
    assert jsonl_ids(path) == Counter({events[0].event_id: 1, events[2].event_id: 1})


def test_record_after_stop_is_journaled_for_the_next_start(tmp_path: Path) -> None:
    config = events_config(tmp_path)

    async def first() -> EventLogger:
        logger = EventLogger(config, build_sink(config, str(tmp_path)), base_dir=str(tmp_path))
        logger.start()
        await logger.stop(1)
        logger.record(make_event(1))
        return logger

    late = run(first())
    assert late.spilled == 1 and late.dropped == 0

    async def second() -> EventLogger:
        logger = EventLogger(config, build_sink(config, str(tmp_path)), base_dir=str(tmp_path))
        logger.start()
        await wait_until(lambda: logger.replayed == 1)
        await logger.stop(1)
        return logger

    run(second())
    assert len(jsonl_ids(tmp_path / "events.jsonl")) == 1


def test_two_loggers_share_a_spool_dir_through_slots(tmp_path: Path) -> None:
    config = events_config(tmp_path)

    async def main() -> tuple[EventLogger, EventLogger]:
        a = EventLogger(config, build_sink(config, str(tmp_path)), base_dir=str(tmp_path))
        b = EventLogger(config, build_sink(config, str(tmp_path)), base_dir=str(tmp_path))
        a.start()
        b.start()
        for i in range(200):
            (a if i % 2 else b).record(make_event(i))
        await wait_until(lambda: a.delivered + b.delivered == 200)
        await a.stop(2)
        await b.stop(2)
        return a, b

    run(main())
    assert sorted(p.name for p in (tmp_path / "spool").iterdir() if p.is_dir()) == ["slot-0", "slot-1"]
    ids = jsonl_ids(tmp_path / "events.jsonl")
    assert len(ids) == 200 and set(ids.values()) == {1}


def test_stdout_sink_writes_rows() -> None:
    stream = io.StringIO()
    sink = StdoutSink(stream)
    sink.write_batch([make_event(1), make_event(2)])
    rows = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["identifier"] for r in rows] == ["user-1", "user-2"]


def test_build_sink_choices(tmp_path: Path) -> None:
    assert isinstance(build_sink(events_config(tmp_path, sink="auto"), str(tmp_path)), JsonlSink)
    assert isinstance(build_sink(events_config(tmp_path, sink="stdout"), str(tmp_path)), StdoutSink)
    relative = build_sink(events_config(tmp_path, file="var/e.jsonl"), str(tmp_path))
    assert isinstance(relative, JsonlSink) and relative.path == tmp_path / "var" / "e.jsonl"
    bq = build_sink(replace(events_config(tmp_path, sink="auto"), bigquery_project_id="proj"), str(tmp_path))
    assert bq.name == "bigquery"


def test_record_is_cheap(tmp_path: Path) -> None:
    config = events_config(tmp_path, buffer_size=20_000, batch_size=500)

    async def main() -> float:
        logger = EventLogger(config, build_sink(config, str(tmp_path)), base_dir=str(tmp_path))
        logger.start()
        started = time.perf_counter()
        for i in range(5000):
            logger.record(make_event(i))
        elapsed = time.perf_counter() - started
        await wait_until(lambda: logger.delivered == 5000)
        await logger.stop(5)
        return elapsed / 5000

    per_event = run(main())
    assert per_event < 200e-6, f"record() took {per_event * 1e6:.1f} us per event"


def test_changing_metadata_after_record_does_not_change_the_row(tmp_path: Path) -> None:
    config = events_config(tmp_path)

    async def main() -> None:
        logger = EventLogger(config, build_sink(config, str(tmp_path)), base_dir=str(tmp_path))
        logger.start()
        metadata: dict[str, Any] = {"tokens": 1}
        logger.record(Event("CompletionsFinished", "s", "i", metadata))
        metadata["tokens"] = 2
        await logger.stop(2)

    run(main())
    (row,) = [orjson.loads(line) for line in (tmp_path / "events.jsonl").read_bytes().splitlines()]
    assert orjson.loads(row["metadata"]) == {"tokens": 1}


def test_jsonl_file_moved_away_by_rotation_starts_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    first = [Event("CompletionsFinished", "static", "a", {"n": 1})]
    second = [Event("CompletionsFinished", "static", "a", {"n": 2})]
    sink.write_batch(first)
    path.rename(tmp_path / "events.jsonl.1")  # logrotate's default "create" mode
    sink.write_batch(second)
    sink.close()
    assert [json.loads(json.loads(line)["metadata"])["n"] for line in (tmp_path / "events.jsonl.1").read_text().splitlines()] == [1]
    assert [json.loads(json.loads(line)["metadata"])["n"] for line in path.read_text().splitlines()] == [2]
