"""Usage events through the whole gateway: SIGKILL and SIGTERM under HTTP load, BigQuery at a local endpoint.

Each completed request is identified by its ``X-Trace`` header, which the
gateway also puts into the event's ``metadata.trace_id``.  Every case ends
with each completed request's event stored exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes.bigquery import FakeBigQuery
from fakes.processes import GatewayProcess, wait_until
from tests.conftest import TOKEN_A

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

PROJECT = "gateway-events"
LOAD_THREADS = 4
# The completions handler records its event in on_finish, which Tornado runs
# just after the response's last byte went out: a SIGKILL landing in that
# window (tens of microseconds) loses the event of a request its client saw
# finish.  Until the handler records before finishing, the SIGKILL cases
# tolerate that for the requests completing at the very moment of the kill
# (at most one per client thread); everything the gateway journaled is
# checked strictly.  Set to False once the handler is fixed.
RECORDED_AFTER_LAST_BYTE = False
ROUTE = "/v1/completions/anthropic-messages"
MODEL = "claude-3-haiku-20240307"


@pytest.fixture
def bq() -> Iterator[FakeBigQuery]:
    with FakeBigQuery() as fake:
        yield fake


def bq_env(bq: FakeBigQuery, **extra: str) -> dict[str, str]:
    return {"CODY_GATEWAY_BIGQUERY_PROJECT_ID": PROJECT, "CODY_GATEWAY_BIGQUERY_API_URL": bq.url, **extra}


def body(stream: bool, prompt: str) -> bytes:
    return json.dumps({
        "model": MODEL, "max_tokens": 100, "stream": stream,
        "messages": [{"role": "user", "content": prompt}],
    }).encode()


HEADERS = {"Authorization": f"Bearer {TOKEN_A}", "X-Sourcegraph-Feature": "chat_completions", "Content-Type": "application/json"}


class Load:
    """Client threads sending a mix of streamed and plain requests; keeps the trace id of each one that completed."""

    def __init__(self, base_url: str, threads: int = LOAD_THREADS) -> None:
        self.base_url = base_url
        self.completed: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, index: int) -> None:
        with httpx.Client(timeout=10) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                stream = (n + index) % 2 == 0
                try:
                    with client.stream("POST", self.base_url + ROUTE, content=body(stream, "fake:tokens=5"), headers=HEADERS) as r:
                        r.read()
                        if r.status_code == 200 and (not stream or b"message_stop" in r.content):
                            self.completed.append(r.headers["X-Trace"])
                except httpx.HTTPError:
                    if self._stop.is_set():
                        return
                    time.sleep(0.01)  # gateway gone: back off a little until the test stops us

    def stop(self) -> list[str]:
        self._stop.set()
        for t in self._threads:
            t.join(15)
        return list(self.completed)


def traces_in_bigquery(bq: FakeBigQuery) -> Counter[str]:
    counts: Counter[str] = Counter()
    for row in bq.rows(project=PROJECT):
        if row.get("name") == "CompletionsFinished":
            counts[json.loads(row["metadata"]).get("trace_id", "")] += 1
    return counts


def assert_exactly_once(bq: FakeBigQuery, traces: list[str]) -> None:
    ids = bq.event_id_counts(project=PROJECT)
    assert max(ids.values(), default=1) == 1, "an event_id is stored twice"
    counts = traces_in_bigquery(bq)
    missing = [t for t in traces if counts[t] == 0]
    repeated = [t for t in traces if counts[t] > 1]
    assert not missing, f"{len(missing)} of {len(traces)} completed requests have no event"
    assert not repeated, f"{len(repeated)} completed requests have more than one event"


def spool_files(tmp_path: Path, prefix: str = "") -> list[Path]:
    return [p for p in (tmp_path / "spool").rglob(prefix + "*") if p.is_file() and not p.name.endswith(".lock")]


def journaled_event_ids(tmp_path: Path) -> set[str]:
    """Every event id in the spool's journal and spill files (read while no gateway runs)."""
    ids: set[str] = set()
    for path in (tmp_path / "spool").rglob("*.jsonl"):
        for line in path.read_bytes().split(b"\n"):
            try:
                ids.add(json.loads(line)["event_id"])
            except ValueError:
                continue  # the empty tail, or a line torn by the kill
    return ids


def assert_killed_run_complete(bq: FakeBigQuery, accepted: set[str | None], seen: list[str]) -> None:
    ids = bq.event_id_counts(project=PROJECT)
    assert accepted <= set(ids), f"{len(accepted - set(ids))} journaled events missing"
    assert max(ids.values(), default=1) == 1, "an event_id is stored twice"
    counts = traces_in_bigquery(bq)
    missing = {t for t in seen if counts[t] == 0}
    tolerated = set(seen[-LOAD_THREADS:]) if RECORDED_AFTER_LAST_BYTE else set()
    assert missing <= tolerated, f"{len(missing)} completed requests have no event"
    assert not [t for t in seen if counts[t] > 1], "a request has two events"


def only_own_journal(tmp_path: Path, gw: GatewayProcess) -> bool:
    """Everything earlier runs left is replayed: the spool holds only the live process's journal."""
    return all(f"-{gw.process.proc.pid}-" in p.name for p in spool_files(tmp_path))


def all_present(bq: FakeBigQuery, traces: list[str]) -> bool:
    counts = traces_in_bigquery(bq)
    return all(counts[t] for t in traces)


def test_sigkill_under_load_then_restart(start_gateway: Any, bq: FakeBigQuery, tmp_path: Path) -> None:
    gw: GatewayProcess = start_gateway(env=bq_env(bq))
    load = Load(gw.base_url)
    wait_until(lambda: len(load.completed) >= 300, 30, what="300 completed requests")
    bq.set_delay(0.3)  # so that batches are in flight, and events still queued, at the kill
    wait_until(lambda: len(load.completed) >= 400, 30, what="400 completed requests")
    gw.kill()
    seen = load.stop()
    accepted = journaled_event_ids(tmp_path) | set(bq.event_id_counts())
    bq.set_delay(0)

    restarted = start_gateway(env=bq_env(bq), name="restarted")
    wait_until(lambda: accepted <= set(bq.event_id_counts()), 30, what="every journaled event")
    wait_until(lambda: only_own_journal(tmp_path, restarted), 10, what="leftovers replayed and removed")
    assert restarted.stop() == 0
    assert_killed_run_complete(bq, accepted, seen)
    assert spool_files(tmp_path) == []


def test_sigkill_while_bigquery_is_down_replays_spilled_events(start_gateway: Any, bq: FakeBigQuery, tmp_path: Path) -> None:
    env = bq_env(bq, CODY_GATEWAY_BIGQUERY_EVENT_BUFFER_SIZE="20")
    gw: GatewayProcess = start_gateway(env=env)
    load = Load(gw.base_url)
    wait_until(lambda: len(load.completed) >= 100, 30, what="100 completed requests")
    bq.go_down()
    wait_until(lambda: spool_files(tmp_path, "spill-"), 30, what="a spill file")
    wait_until(lambda: len(load.completed) >= 400, 30, what="400 completed requests")
    gw.kill()
    seen = load.stop()
    accepted = journaled_event_ids(tmp_path) | set(bq.event_id_counts())
    bq.come_up()

    restarted = start_gateway(env=env, name="restarted")
    wait_until(lambda: accepted <= set(bq.event_id_counts()), 30, what="every journaled event")
    wait_until(lambda: only_own_journal(tmp_path, restarted), 10, what="spill files replayed and removed")
    assert restarted.stop() == 0
    assert_killed_run_complete(bq, accepted, seen)


@pytest.mark.parametrize("bigquery_at_shutdown", ["up", "down"])
def test_sigterm_with_streams_in_flight(start_gateway: Any, bq: FakeBigQuery, tmp_path: Path, bigquery_at_shutdown: str) -> None:
    env = bq_env(bq, CODY_GATEWAY_SERVER_DRAIN_TIMEOUT_S="10")
    gw: GatewayProcess = start_gateway(env=env)
    streams = 8
    started = threading.Barrier(streams + 1)
    finished: list[str] = []
    errors: list[BaseException] = []

    def slow_stream() -> None:
        try:
            with httpx.Client(timeout=20) as client, client.stream(
                "POST", gw.base_url + ROUTE, content=body(True, "fake:tokens=30 fake:tokens_per_s=20"), headers=HEADERS
            ) as r:
                chunks = r.iter_bytes()
                first = next(chunks)
                started.wait(10)
                rest = b"".join(chunks)
                if r.status_code == 200 and b"message_stop" in first + rest:
                    finished.append(r.headers["X-Trace"])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=slow_stream, daemon=True) for _ in range(streams)]
    for t in threads:
        t.start()
    started.wait(15)
    if bigquery_at_shutdown == "down":
        bq.go_down()
    began = time.monotonic()
    gw.process.signal(signal.SIGTERM)
    for t in threads:
        t.join(20)
    assert not errors, errors
    assert len(finished) == streams, "every in-flight stream finishes during the drain"
    assert gw.process.proc.wait(20) == 0
    assert time.monotonic() - began < 8, "drain (~1.5 s of stream) plus event flush or spill"

    if bigquery_at_shutdown == "up":
        assert_exactly_once(bq, finished)  # flushed before exit
        assert spool_files(tmp_path) == []
        return
    assert spool_files(tmp_path, "spill-"), "undeliverable events were spilled at shutdown"
    bq.come_up()
    restarted = start_gateway(env=env, name="restarted")
    wait_until(lambda: all_present(bq, finished), 30, what="spilled events replayed")
    wait_until(lambda: only_own_journal(tmp_path, restarted), 10, what="spill files replayed and removed")
    assert restarted.stop() == 0
    assert_exactly_once(bq, finished)
    assert spool_files(tmp_path) == []


def worker_pids(gw: GatewayProcess) -> list[int]:
    pid = gw.process.proc.pid
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def test_sigkill_of_one_worker_in_a_multi_process_gateway(
    start_gateway: Any, bq: FakeBigQuery, tmp_path: Path, redis_server: Any
) -> None:
    """The supervisor restarts the killed worker, which takes the freed spool slot and replays its journal."""
    env = bq_env(bq, REDIS_ENDPOINT=redis_server.url)
    gw: GatewayProcess = start_gateway(env=env, args=["--processes", "2"])
    workers = wait_until(lambda: (lambda pids: pids if len(pids) == 2 else None)(worker_pids(gw)), 20, what="two workers")
    load = Load(gw.base_url)
    wait_until(lambda: len(load.completed) >= 300, 30, what="300 completed requests")
    bq.set_delay(0.3)  # batches in flight at the kill
    wait_until(lambda: len(load.completed) >= 400, 30, what="400 completed requests")
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    killed_at = len(load.completed)
    bq.set_delay(0)
    wait_until(lambda: (lambda pids: len(pids) == 2 and victim not in pids)(worker_pids(gw)), 20, what="worker restarted")
    wait_until(lambda: sum("serving http" in line for line in list(gw.process.lines)) == 3, 20, what="restarted worker serving")
    wait_until(lambda: len(load.completed) >= killed_at + 200, 30, what="traffic after the restart")
    seen = load.stop()
    assert gw.stop() == 0

    assert sorted(p.name for p in (tmp_path / "spool").iterdir() if p.is_dir()) == ["slot-0", "slot-1"]
    assert spool_files(tmp_path) == [], "every journal replayed and removed"
    ids = bq.event_id_counts(project=PROJECT)
    assert max(ids.values()) == 1, "an event_id is stored twice"
    counts = traces_in_bigquery(bq)
    missing = [i for i, t in enumerate(seen) if counts[t] == 0]
    # Only requests finishing on the killed worker at the moment of the kill may lack an event (see RECORDED_AFTER_LAST_BYTE).
    limit = LOAD_THREADS if RECORDED_AFTER_LAST_BYTE else 0
    assert len(missing) <= limit and all(abs(i - killed_at) <= 2 * LOAD_THREADS for i in missing), missing
