"""A small BigQuery-compatible REST endpoint for tests (127.0.0.1 only).

It implements the calls google-cloud-bigquery makes for streaming inserts:
datasets get/insert, tables get/insert and ``tabledata.insertAll`` (with
insertId de-duplication, kept for the server's lifetime, which is stricter
than BigQuery's best-effort minute).  Tests steer it to fail, answer
slowly, lose responses, or go down (connections refused), and count the
stored rows by ``event_id``.

In a test::

    with FakeBigQuery() as bq:          # serves on its own thread
        sink = BigQuerySink(project_id="p", dataset="d", table="t", api_url=bq.url)
        ...
        assert bq.event_id_counts() == {...}

Standalone (for trying the gateway by hand)::

    python -m fakes.bigquery --port 9050
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import tornado.web
from tornado.httpserver import HTTPServer


@dataclass
class _Table:
    schema: dict[str, Any] | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    insert_ids: set[str] = field(default_factory=set)


@dataclass
class _State:
    datasets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    tables: dict[tuple[str, str, str], _Table] = field(default_factory=dict)
    fail_status: int = 0  # answer every call with this status when non-zero
    fail_insert_next: int = 0  # fail only this many further insertAll calls
    lose_responses: bool = False  # store rows, then answer 503 (the client retries)
    delay_s: float = 0.0
    poison_identifier: str | None = None  # rows with this identifier are "invalid"
    insert_calls: int = 0
    received_rows: int = 0
    duplicate_rows: int = 0
    requests: int = 0


def _error(code: int, message: str, reason: str, status: str) -> bytes:
    return orjson.dumps(
        {"error": {"code": code, "message": message, "errors": [{"message": message, "reason": reason}], "status": status}}
    )


class _Handler(tornado.web.RequestHandler):
    def initialize(self, fake: FakeBigQuery) -> None:
        self.fake = fake

    def check_xsrf_cookie(self) -> None:  # pragma: no cover - API server
        pass

    def _json(self, status: int, body: bytes) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(body)

    async def _gate(self, *, insert: bool = False) -> bool:
        """Apply the steering knobs; False when the call was answered with a failure."""
        with self.fake.lock:
            state = self.fake.state
            state.requests += 1
            delay = state.delay_s
            fail = state.fail_status
            if not fail and insert and state.fail_insert_next > 0:
                state.fail_insert_next -= 1
                fail = 503
        if delay:
            await asyncio.sleep(delay)
        if fail:
            self._json(fail, _error(fail, "backend error (injected)", "backendError", "UNAVAILABLE"))
            return False
        return True

    def _body(self) -> dict[str, Any]:
        return orjson.loads(self.request.body or b"{}")


class _Datasets(_Handler):
    async def post(self, project: str) -> None:
        if not await self._gate():
            return
        body = self._body()
        dataset_id = body.get("datasetReference", {}).get("datasetId", "")
        with self.fake.lock:
            key = (project, dataset_id)
            if key in self.fake.state.datasets:
                self._json(409, _error(409, f"Already Exists: Dataset {project}:{dataset_id}", "duplicate", "ALREADY_EXISTS"))
                return
            resource = {**body, "kind": "bigquery#dataset", "id": f"{project}:{dataset_id}",
                        "datasetReference": {"projectId": project, "datasetId": dataset_id}}
            self.fake.state.datasets[key] = resource
        self._json(200, orjson.dumps(resource))


class _Dataset(_Handler):
    async def get(self, project: str, dataset_id: str) -> None:
        if not await self._gate():
            return
        with self.fake.lock:
            resource = self.fake.state.datasets.get((project, dataset_id))
        if resource is None:
            self._json(404, _error(404, f"Not found: Dataset {project}:{dataset_id}", "notFound", "NOT_FOUND"))
            return
        self._json(200, orjson.dumps(resource))


class _Tables(_Handler):
    async def post(self, project: str, dataset_id: str) -> None:
        if not await self._gate():
            return
        body = self._body()
        table_id = body.get("tableReference", {}).get("tableId", "")
        with self.fake.lock:
            if (project, dataset_id) not in self.fake.state.datasets:
                self._json(404, _error(404, f"Not found: Dataset {project}:{dataset_id}", "notFound", "NOT_FOUND"))
                return
            key = (project, dataset_id, table_id)
            if key in self.fake.state.tables:
                self._json(409, _error(409, f"Already Exists: Table {project}:{dataset_id}.{table_id}", "duplicate", "ALREADY_EXISTS"))
                return
            self.fake.state.tables[key] = _Table(schema=body.get("schema"))
        resource = {**body, "kind": "bigquery#table", "id": f"{project}:{dataset_id}.{table_id}",
                    "tableReference": {"projectId": project, "datasetId": dataset_id, "tableId": table_id}}
        self._json(200, orjson.dumps(resource))


class _Table_(_Handler):
    async def get(self, project: str, dataset_id: str, table_id: str) -> None:
        if not await self._gate():
            return
        with self.fake.lock:
            table = self.fake.state.tables.get((project, dataset_id, table_id))
            count = len(table.rows) if table else 0
            schema = table.schema if table else None
        if table is None:
            self._json(404, _error(404, f"Not found: Table {project}:{dataset_id}.{table_id}", "notFound", "NOT_FOUND"))
            return
        self._json(200, orjson.dumps({
            "kind": "bigquery#table", "id": f"{project}:{dataset_id}.{table_id}",
            "tableReference": {"projectId": project, "datasetId": dataset_id, "tableId": table_id},
            "schema": schema or {"fields": []}, "numRows": str(count), "type": "TABLE",
        }))


class _InsertAll(_Handler):
    async def post(self, project: str, dataset_id: str, table_id: str) -> None:
        if not await self._gate(insert=True):
            return
        body = self._body()
        ignore_unknown = bool(body.get("ignoreUnknownValues"))
        rows = body.get("rows", [])
        with self.fake.lock:
            state = self.fake.state
            state.insert_calls += 1
            table = state.tables.get((project, dataset_id, table_id))
            if table is None:
                self._json(404, _error(404, f"Not found: Table {project}:{dataset_id}.{table_id}", "notFound", "NOT_FOUND"))
                return
            known = {f["name"] for f in (table.schema or {}).get("fields", [])}
            errors = []
            for index, row in enumerate(rows):
                extra = set(row.get("json", {})) - known if known and not ignore_unknown else set()
                if extra:
                    errors.append({"index": index, "errors": [{"reason": "invalid", "message": f"no such field: {sorted(extra)[0]}."}]})
                elif state.poison_identifier is not None and row.get("json", {}).get("identifier") == state.poison_identifier:
                    errors.append({"index": index, "errors": [{"reason": "invalid", "message": "poisoned row (injected)"}]})
            if errors:
                # Like BigQuery without skipInvalidRows: nothing is stored.
                bad = {e["index"] for e in errors}
                errors += [{"index": i, "errors": [{"reason": "stopped", "message": ""}]} for i in range(len(rows)) if i not in bad]
                self._json(200, orjson.dumps({"kind": "bigquery#tableDataInsertAllResponse", "insertErrors": errors}))
                return
            for row in rows:
                state.received_rows += 1
                insert_id = row.get("insertId")
                if insert_id:
                    if insert_id in table.insert_ids:
                        state.duplicate_rows += 1
                        continue
                    table.insert_ids.add(insert_id)
                data = dict(row.get("json", {}))
                if known and ignore_unknown:
                    data = {k: v for k, v in data.items() if k in known}
                table.rows.append(data)
            lose = state.lose_responses
        if lose:
            self._json(503, _error(503, "response lost (injected)", "backendError", "UNAVAILABLE"))
            return
        self._json(200, orjson.dumps({"kind": "bigquery#tableDataInsertAllResponse"}))


class FakeBigQuery:
    """The endpoint, served by a Tornado app on its own thread and loop."""

    def __init__(self, port: int = 0) -> None:
        self.lock = threading.Lock()
        self.state = _State()
        self._requested_port = port
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: HTTPServer | None = None
        self._ready = threading.Event()
        self._placeholder: socket.socket | None = None

    # -- lifecycle -------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> tornado.web.Application:
        base = r"/bigquery/v2/projects/([^/]+)"
        kw = {"fake": self}
        return tornado.web.Application([
            (base + r"/datasets", _Datasets, kw),
            (base + r"/datasets/([^/]+)", _Dataset, kw),
            (base + r"/datasets/([^/]+)/tables", _Tables, kw),
            (base + r"/datasets/([^/]+)/tables/([^/]+)", _Table_, kw),
            (base + r"/datasets/([^/]+)/tables/([^/]+)/insertAll", _InsertAll, kw),
        ])

    @staticmethod
    def _socket(port: int, *, listen: bool) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        if listen:
            sock.setblocking(False)
            sock.listen(128)
        return sock

    def start(self) -> FakeBigQuery:
        sockets = [self._socket(self._requested_port, listen=True)]
        self.port = sockets[0].getsockname()[1]
        # Bound but never listening: keeps the port ours while we are "down"
        # (connections are refused, and no other process can take the port).
        self._placeholder = self._socket(self.port, listen=False)
        self._thread = threading.Thread(target=self._serve, args=(sockets,), name="fake-bigquery", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake BigQuery did not start")
        return self

    def _serve(self, sockets: list[socket.socket]) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)

        async def listen() -> None:
            self._server = HTTPServer(self.app())
            self._server.add_sockets(sockets)
            self._ready.set()

        self._loop.run_until_complete(listen())
        self._loop.run_forever()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def _call(self, fn: Any) -> Any:
        """Run ``fn`` (sync or coroutine function) on the server's loop and wait."""
        assert self._loop is not None

        async def wrapper() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(10)

    def stop(self) -> None:
        if self._loop is None:
            return
        self.go_down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop = None
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None

    def __enter__(self) -> FakeBigQuery:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- steering --------------------------------------------------------

    def go_down(self) -> None:
        """Stop listening and drop open connections: clients get refused."""
        async def down() -> None:
            if self._server is not None:
                self._server.stop()
                await self._server.close_all_connections()
                self._server = None

        self._call(down)

    def come_up(self) -> None:
        """Listen again on the same port."""
        def up() -> None:
            if self._server is None:
                self._server = HTTPServer(self.app())
                self._server.add_sockets([self._socket(self.port, listen=True)])

        self._call(up)

    def set_failing(self, status: int = 503) -> None:
        """Answer every call with ``status`` (0 to heal)."""
        with self.lock:
            self.state.fail_status = status

    def fail_inserts(self, count: int) -> None:
        with self.lock:
            self.state.fail_insert_next = count

    def set_delay(self, seconds: float) -> None:
        with self.lock:
            self.state.delay_s = seconds

    def set_poison(self, identifier: str | None) -> None:
        """Reject rows with this identifier as invalid (None to stop)."""
        with self.lock:
            self.state.poison_identifier = identifier

    def set_lose_responses(self, lose: bool) -> None:
        with self.lock:
            self.state.lose_responses = lose

    # -- inspection ------------------------------------------------------

    def rows(self, project: str | None = None, dataset: str | None = None, table: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [
                dict(row)
                for (p, d, t), tab in self.state.tables.items()
                if (project in (None, p)) and (dataset in (None, d)) and (table in (None, t))
                for row in tab.rows
            ]

    def event_id_counts(self, **where: str) -> collections.Counter[str | None]:
        return collections.Counter(row.get("event_id") for row in self.rows(**where))

    def table_schema(self, project: str, dataset: str, table: str) -> dict[str, Any] | None:
        with self.lock:
            tab = self.state.tables.get((project, dataset, table))
            return None if tab is None else tab.schema

    def stats(self) -> dict[str, int]:
        with self.lock:
            s = self.state
            return {"insert_calls": s.insert_calls, "received_rows": s.received_rows,
                    "duplicate_rows": s.duplicate_rows, "requests": s.requests,
                    "stored_rows": sum(len(t.rows) for t in s.tables.values())}

    def wait_for_rows(self, count: int, timeout_s: float = 30.0, **where: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self.rows(**where)
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description="local BigQuery-compatible endpoint (tests and demos)")
    parser.add_argument("--port", type=int, default=9050)
    args = parser.parse_args()
    fake = FakeBigQuery(args.port).start()
    print(f"fake BigQuery at {fake.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
