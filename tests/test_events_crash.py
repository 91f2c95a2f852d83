"""Process deaths: SIGKILL mid-run and SIGTERM with work in flight, at the EventLogger level.

A driver process (this module run with ``python -m tests.test_events_crash``)
records events at a steady pace and prints each event_id only after
``record()`` returned, i.e. what a client would have seen finish.  The
test kills it, restarts it, and checks that every printed id is stored
exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fakes.bigquery import FakeBigQuery

REPO = Path(__file__).resolve().parent.parent
PROJECT, DATASET, TABLE = "crash-project", "cody_gateway", "events"

pytestmark = pytest.mark.timeout(90)


# -- the driver (runs in the child process) ---------------------------------


def driver(args: dict[str, Any]) -> None:
    from conf.model import EventsConfig
    from usage.events import Event
    from usage.logger import EventLogger
    from usage.sinks import build_sink

    config = EventsConfig(
        sink=args["sink"],
        file=args["file"],
        spool_dir=args["spool_dir"],
        buffer_size=args.get("buffer_size", 2000),
        batch_size=args.get("batch_size", 100),
        flush_interval_ms=20,
        bigquery_project_id=PROJECT,
        bigquery_dataset=DATASET,
        bigquery_table=TABLE,
        bigquery_api_url=args.get("api_url", ""),
        bigquery_create_if_missing=True,
    )
    out = sys.stdout

    async def main() -> None:
        logger = EventLogger(
            config, build_sink(config, args["base_dir"]), base_dir=args["base_dir"],
            retry_base_s=0.02, retry_max_s=0.2, spill_after_s=args.get("spill_after_s", 0.5),
        )
        logger.start()
        term = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, term.set)
        out.write("READY\n")
        out.flush()
        sent = 0
        limit = args.get("count", 0)
        last_stats = 0.0
        while not term.is_set():
            if sent < limit:
                ids = []
                for _ in range(args.get("per_tick", 10)):
                    event = Event("CompletionsFinished", "dotcom-user", f"user-{sent}", {"n": sent})
                    logger.record(event)
                    ids.append(event.event_id)
                    sent += 1
                out.write("".join(f"ID {i}\n" for i in ids))
                out.flush()
            now = time.monotonic()
            if now - last_stats > 0.05:
                out.write("STATS " + orjson.dumps(logger.stats()).decode() + "\n")
                out.flush()
                last_stats = now
            try:
                await asyncio.wait_for(term.wait(), args.get("tick_s", 0.005))
            except TimeoutError:
                pass
        # SIGTERM: streams still in flight finish (and record their events) while draining.
        for _ in range(args.get("drain_events", 0)):
            event = Event("CompletionsFinished", "dotcom-user", "draining", {})
            logger.record(event)
            out.write(f"ID {event.event_id}\n")
            await asyncio.sleep(0.002)
        out.flush()
        await logger.stop(args.get("stop_timeout_s", 2.0))
        out.write("STOPPED " + orjson.dumps(logger.stats()).decode() + "\n")
        out.flush()

    asyncio.run(main())


# -- the test side ------------------------------------------------------------


class Driver:
    def __init__(self, args: dict[str, Any]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_events_crash", orjson.dumps(args).decode()],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for(lambda: "READY" in self.lines, 20)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def ids(self) -> list[str]:
        return [line[3:] for line in list(self.lines) if line.startswith("ID ")]

    def stats(self) -> dict[str, int]:
        for line in reversed(list(self.lines)):
            if line.startswith(("STATS ", "STOPPED ")):
                return dict(orjson.loads(line.split(" ", 1)[1]))
        return {}

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.proc.poll() is not None and not predicate():
                self._reader.join(5)
                if predicate():
                    return
                stderr = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"driver exited ({self.proc.returncode}): {stderr[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met; last stats {self.stats()}")
            time.sleep(0.01)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(5)

    def terminate(self, timeout_s: float = 15.0) -> float:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout_s)
        self._reader.join(5)
        return time.monotonic() - started

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def drivers() -> Iterator[Callable[[dict[str, Any]], Driver]]:
    started: list[Driver] = []

    def start(args: dict[str, Any]) -> Driver:
        d = Driver(args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


@pytest.fixture
def bq() -> Iterator[FakeBigQuery]:
    with FakeBigQuery() as fake:
        yield fake


def base_args(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    return {
        "sink": "jsonl", "file": str(tmp_path / "events.jsonl"), "spool_dir": str(tmp_path / "spool"),
        "base_dir": str(tmp_path), **kw,
    }


def jsonl_counts(path: Path) -> Counter[str]:
    if not path.exists():
        return Counter()
    data = path.read_bytes()
    # The driver may be mid-append: ignore an unterminated last line.
    lines = data.split(b"\n")[:-1]
    return Counter(orjson.loads(line)["event_id"] for line in lines if line)


def assert_once(counts: Counter[str] | Counter[str | None], ids: list[str]) -> None:
    missing = [i for i in ids if counts[i] == 0]
    repeated = [i for i, c in counts.items() if c > 1]
    assert not missing, f"{len(missing)} of {len(ids)} acknowledged events missing"
    assert not repeated, f"{len(repeated)} events stored twice"
    assert set(counts) == set(ids)


def leftover_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "spool").rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def test_sigkill_mid_run_then_restart_bigquery(tmp_path: Path, bq: FakeBigQuery, drivers: Any) -> None:
    args = base_args(tmp_path, sink="bigquery", api_url=bq.url, count=100_000, per_tick=20)
    first = drivers(args)
    first.wait_for(lambda: len(first.ids()) >= 2000)
    first.kill()
    seen = first.ids()
    assert bq.stats()["stored_rows"] < len(seen) or leftover_files(tmp_path)

    second = drivers({**args, "count": 0})
    second.wait_for(lambda: set(bq.event_id_counts()) >= set(seen), 30)
    second.wait_for(lambda: second.stats().get("pending_replay", 1) == 0)
    second.terminate()
    assert_once(bq.event_id_counts(project=PROJECT), seen)
    assert second.stats()["dropped"] == 0
    assert leftover_files(tmp_path) == []


def test_sigkill_mid_run_then_restart_jsonl_is_exactly_once_by_construction(tmp_path: Path, drivers: Any) -> None:
    args = base_args(tmp_path, count=100_000, per_tick=50, batch_size=200)
    path = tmp_path / "events.jsonl"
    first = drivers(args)
    first.wait_for(lambda: len(first.ids()) >= 5000)
    first.kill()
    seen = first.ids()

    second = drivers({**args, "count": 0})
    second.wait_for(lambda: set(jsonl_counts(path)) >= set(seen), 30)
    second.wait_for(lambda: second.stats().get("pending_replay", 1) == 0)
    second.terminate()
    assert_once(jsonl_counts(path), seen)
    assert leftover_files(tmp_path) == []


def test_sigkill_while_bigquery_is_down_replays_spilled_events(tmp_path: Path, bq: FakeBigQuery, drivers: Any) -> None:
    args = base_args(tmp_path, sink="bigquery", api_url=bq.url, count=100_000, per_tick=10, spill_after_s=0.3)
    first = drivers(args)
    first.wait_for(lambda: first.stats().get("delivered", 0) >= 200)
    bq.go_down()
    first.wait_for(lambda: first.stats().get("spilled", 0) >= 300)
    first.kill()
    seen = first.ids()
    assert any(name.startswith("spill-") for name in leftover_files(tmp_path))
    bq.come_up()

    second = drivers({**args, "count": 0})
    second.wait_for(lambda: set(bq.event_id_counts()) >= set(seen), 30)
    second.wait_for(lambda: second.stats().get("pending_replay", 1) == 0)
    second.terminate()
    assert_once(bq.event_id_counts(project=PROJECT), seen)
    assert second.stats()["replayed"] > 0 and second.stats()["dropped"] == 0
    assert leftover_files(tmp_path) == []


def test_sigterm_with_work_in_flight_and_a_slow_sink(tmp_path: Path, bq: FakeBigQuery, drivers: Any) -> None:
    args = base_args(
        tmp_path, sink="bigquery", api_url=bq.url, count=100_000, per_tick=10,
        drain_events=50, stop_timeout_s=1.0,
    )
    first = drivers(args)
    first.wait_for(lambda: first.stats().get("delivered", 0) >= 200)
    bq.set_delay(0.4)  # flushes in flight when SIGTERM arrives
    first.wait_for(lambda: len(first.ids()) >= 1500)
    took = first.terminate()
    assert first.proc.returncode == 0
    assert took < 5, f"shutdown took {took:.1f}s"
    seen = first.ids()
    stopped = first.stats()
    assert stopped["dropped"] == 0 and stopped["backlog"] <= stopped["queued"]
    bq.set_delay(0)

    # Whatever the stop could not deliver was spilled (or stays journaled): the next start replays it.
    second = drivers({**args, "count": 0, "drain_events": 0})
    second.wait_for(lambda: set(bq.event_id_counts()) >= set(seen), 30)
    second.wait_for(lambda: second.stats().get("pending_replay", 1) == 0)
    second.terminate()
    assert_once(bq.event_id_counts(project=PROJECT), seen)
    assert leftover_files(tmp_path) == []


if __name__ == "__main__":
    driver(orjson.loads(sys.argv[1]))
