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
from typing import Any, TextIO

from conf.model import EventsConfig
from usage.events import Event, EventSink

log = logging.getLogger(__name__)

# How much of the JSONL file's tail is read back at start to find events a
# crash delivered without acknowledging (see JsonlSink.recent_event_ids).
JSONL_TAIL_BYTES = 8 << 20


class JsonlSink:
    """One JSON object per line (``Event.to_row()``), appended to a file.

    Each batch is one ``os.write`` on an ``O_APPEND`` descriptor, so
    several gateway processes can share the file without interleaving
    lines. Rotation needs no signal: a file moved or removed (logrotate's
    default ``create`` mode) is noticed at the next batch, which starts a
    new file at the configured path; ``copytruncate`` works as is.
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
        fd = self._fd
        if fd is not None and not self._still_the_file(fd):
            os.close(fd)
            fd = self._fd = None
        if fd is None:
            fd = self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return fd

    def _still_the_file(self, fd: int) -> bool:
        """Whether the open descriptor is still the file at ``path`` (one stat per batch)."""
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (at_path.st_ino, at_path.st_dev) == (held.st_ino, held.st_dev)

    def write_batch(self, events: list[Event]) -> None:
        if not events:
            return
        self.write_lines([e.to_json_line() for e in events])

    def write_lines(self, lines: list[bytes]) -> None:
        """The events as already encoded (each its ``to_json_line``): the logger has
        them from journaling, and encoding them again here held the GIL
        against the event loop."""
        if not lines:
            return
        data = b"".join(lines)
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


class RejectedRows(Exception):
    """The sink will never accept these events (a poison row); the rest may be retried at once.

    The logger sets the rejected events aside in a dead-letter file instead
    of retrying them for ever, which would block every later event.
    """

    def __init__(self, event_ids: set[str], message: str) -> None:
        super().__init__(message)
        self.event_ids = event_ids


class BigQueryInsertError(RuntimeError):
    """insertAll answered, but with row errors (the whole request is retried)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        reasons = sorted({err.get("reason", "?") for row in errors for err in row.get("errors", [])})
        super().__init__(f"BigQuery rejected {len(errors)} rows ({', '.join(reasons)}): {errors[:1]}")
        self.errors = errors


class BigQuerySink:
    """Streaming inserts (``tabledata.insertAll``) with ``event_id`` as insertId.

    The client is built lazily on the first write (which runs in the
    logger's executor), so a slow credential lookup never touches the
    event loop.  The client's own retries are off: the logger retries,
    spills and replays, and re-sending a batch is harmless because
    BigQuery drops rows whose insertId it has already seen.
    """

    name = "bigquery"

    # Streaming-insert limits: 10 MB per request, 500 rows recommended.
    MAX_REQUEST_ROWS = 500
    MAX_REQUEST_BYTES = 8 << 20

    def __init__(
        self,
        *,
        project_id: str,
        dataset: str,
        table: str,
        api_url: str = "",
        create_if_missing: bool = True,
        timeout_s: float = 10.0,
        client: Any = None,
    ) -> None:
        if not project_id:
            raise ValueError("the BigQuery event sink needs a project id")
        self.project_id = project_id
        self.dataset = dataset
        self.table = table
        self.api_url = api_url
        self.create_if_missing = create_if_missing
        self.timeout_s = timeout_s
        self._client = client
        self._lock = threading.Lock()
        self._table_ready = False

    @property
    def table_id(self) -> str:
        return f"{self.project_id}.{self.dataset}.{self.table}"

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                from google.cloud import bigquery

                kwargs: dict[str, Any] = {"project": self.project_id}
                if self.api_url:
                    from google.auth.credentials import AnonymousCredentials

                    kwargs["credentials"] = AnonymousCredentials()
                    kwargs["client_options"] = {"api_endpoint": self.api_url}
                self._client = bigquery.Client(**kwargs)
            return self._client

    def _ensure_table(self, client: Any) -> None:
        if self._table_ready or not self.create_if_missing:
            return
        from google.api_core.exceptions import NotFound
        from google.cloud import bigquery

        with self._lock:
            if self._table_ready:
                return
            dataset_ref = bigquery.DatasetReference(self.project_id, self.dataset)
            try:
                client.get_dataset(dataset_ref, retry=None, timeout=self.timeout_s)
            except NotFound:
                client.create_dataset(bigquery.Dataset(dataset_ref), exists_ok=True, retry=None, timeout=self.timeout_s)
                log.info("created BigQuery dataset %s.%s", self.project_id, self.dataset)
            table_ref = dataset_ref.table(self.table)
            try:
                client.get_table(table_ref, retry=None, timeout=self.timeout_s)
            except NotFound:
                table = bigquery.Table(table_ref, schema=bigquery_schema())
                client.create_table(table, exists_ok=True, retry=None, timeout=self.timeout_s)
                log.info("created BigQuery table %s", self.table_id)
            self._table_ready = True

    def write_batch(self, events: list[Event]) -> None:
        if not events:
            return
        from google.api_core.exceptions import NotFound

        client = self._get_client()
        self._ensure_table(client)
        for rows, ids in self._chunks(events):
            try:
                # ignore_unknown_values: a table created with the reference's
                # five columns (no event_id) still takes our rows.
                errors = client.insert_rows_json(
                    self.table_id,
                    rows,
                    row_ids=ids,
                    ignore_unknown_values=True,
                    retry=None,
                    timeout=self.timeout_s,
                )
            except NotFound:
                self._table_ready = False  # deleted under us: recreate on the retry
                raise
            if errors:
                # "invalid" rows will never go in; the others ("stopped") only
                # failed alongside them.
                invalid = {
                    ids[row["index"]]
                    for row in errors
                    if any(err.get("reason") == "invalid" for err in row.get("errors", []))
                    and 0 <= row.get("index", -1) < len(ids)
                }
                if invalid:
                    raise RejectedRows(invalid, str(BigQueryInsertError(list(errors))))
                raise BigQueryInsertError(list(errors))

    def _chunks(self, events: list[Event]) -> Any:
        rows: list[dict[str, Any]] = []
        ids: list[str] = []
        size = 0
        for event in events:
            row = event.to_row()
            row_size = len(row["metadata"]) + 256
            if rows and (len(rows) >= self.MAX_REQUEST_ROWS or size + row_size > self.MAX_REQUEST_BYTES):
                yield rows, ids
                rows, ids, size = [], [], 0
            rows.append(row)
            ids.append(event.event_id)
            size += row_size
        if rows:
            yield rows, ids

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def bigquery_schema() -> list[Any]:
    """The reference's row (section 6.1) plus ``event_id``."""
    from google.cloud import bigquery

    return [
        bigquery.SchemaField("name", "STRING", mode="REQUIRED"),
        bigquery.SchemaField("source", "STRING", mode="REQUIRED"),
        bigquery.SchemaField("identifier", "STRING", mode="REQUIRED"),
        bigquery.SchemaField("metadata", "STRING"),
        bigquery.SchemaField("created_at", "TIMESTAMP", mode="REQUIRED"),
        bigquery.SchemaField("event_id", "STRING"),
    ]


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
        return BigQuerySink(
            project_id=config.bigquery_project_id,
            dataset=config.bigquery_dataset,
            table=config.bigquery_table,
            api_url=config.bigquery_api_url,
            create_if_missing=config.bigquery_create_if_missing,
        )
    raise ValueError(f"unknown event sink {kind!r}")
