"""Usage events: the record, and the seam sinks plug into.

The event row keeps the reference's BigQuery shape (name, source,
identifier, metadata JSON, created_at) plus ``event_id``, used as
BigQuery's insertId so that a retried flush does not duplicate rows.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import orjson

# Event names of the reference (codygatewayevents).
UNAUTHORIZED = "Unauthorized"
ACCESS_DENIED = "AccessDenied"
RATE_LIMITED = "RateLimited"
COMPLETIONS_FINISHED = "CompletionsFinished"
EMBEDDINGS_FINISHED = "EmbeddingsFinished"
REQUEST_BLOCKED = "RequestBlocked"


def new_id() -> str:
    """32 random hex characters: an event's id (BigQuery insertId), as unique as a UUID4 and cheaper to make."""
    return os.urandom(16).hex()


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    source: str
    identifier: str
    metadata: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    event_id: str = field(default_factory=new_id)

    def to_row(self) -> dict[str, Any]:
        """The BigQuery / JSONL row; ``metadata`` is JSON text as in the reference."""
        return {
            "name": self.name,
            "source": self.source,
            "identifier": self.identifier,
            "metadata": orjson.dumps(self.metadata, option=orjson.OPT_NON_STR_KEYS).decode(),
            "created_at": dt.datetime.fromtimestamp(self.created_at, tz=dt.UTC)
            .isoformat()
            .replace("+00:00", "Z"),
            "event_id": self.event_id,
        }

    def to_json_line(self) -> bytes:
        return orjson.dumps(self.to_row()) + b"\n"

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Event:
        metadata = row.get("metadata")
        if isinstance(metadata, (str, bytes)):
            metadata = orjson.loads(metadata)
        created = row.get("created_at")
        if isinstance(created, str):
            created_at = dt.datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
        else:
            created_at = float(created or time.time())
        return cls(
            name=row["name"],
            source=row["source"],
            identifier=row["identifier"],
            metadata=dict(metadata or {}),
            created_at=created_at,
            event_id=row.get("event_id") or new_id(),
        )


@runtime_checkable
class EventSink(Protocol):
    """Where batches of events end up. ``write_batch`` blocks and runs in an
    executor; it raises on failure so the caller can retry or spill."""

    name: str

    def write_batch(self, events: list[Event]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class EventRecorder(Protocol):
    """What handlers see: a non-blocking ``record``."""

    def record(self, event: Event) -> None: ...
