"""The static source: actors defined in a JSON file, tokens stored as SHA-256 hashes.

The file is re-read on SIGHUP (``reload``) and when its modification time
changes (``watch``). A file that fails validation on reload is ignored with
an error log: the previous actors keep serving, so an operator's typo never
locks everybody out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import jsonschema

from actors.base import NotFromSource
from actors.limits import percentage_concurrency
from actors.model import FEATURES, Actor, RateLimit
from actors.tokens import token_sha256
from conf.durations import parse_duration

log = logging.getLogger("gateway.actors.static")

ACTORS_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["id"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "minLength": 1},
            "name": {"type": "string"},
            "accessEnabled": {"type": "boolean"},
            "token_sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
            "token": {"type": "string", "minLength": 1},
            "tokens_sha256": {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}},
            "endpointAccess": {"type": "object", "additionalProperties": {"type": "boolean"}},
            "rateLimits": {
                "type": "object",
                "propertyNames": {"enum": list(FEATURES)},
                "additionalProperties": {
                    "type": "object",
                    "required": ["limit", "interval"],
                    "additionalProperties": False,
                    "properties": {
                        "limit": {"type": "integer", "minimum": 0},
                        "interval": {"oneOf": [{"type": "string"}, {"type": "number", "minimum": 0}]},
                        "allowedModels": {"type": "array", "items": {"type": "string"}},
                        "concurrentRequests": {"type": "integer", "minimum": 1},
                        "tokensLimit": {"type": "integer", "minimum": 1},
                    },
                },
            },
        },
        "anyOf": [{"required": ["token_sha256"]}, {"required": ["token"]}, {"required": ["tokens_sha256"]}],
    },
}


class StaticActorsError(Exception):
    pass


def parse_actors_file(
    text: str, *, source: str, concurrency_percentage: float, concurrency_interval_s: float
) -> dict[str, Actor]:
    """Map of token SHA-256 to Actor; raises StaticActorsError naming the problem."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StaticActorsError(f"not JSON: {exc}") from exc
    errors = sorted(jsonschema.Draft202012Validator(ACTORS_SCHEMA).iter_errors(data), key=lambda e: list(map(str, e.path)))
    if errors:
        raise StaticActorsError(
            "; ".join(f"[{'.'.join(map(str, e.path)) or 'top'}] {e.message}" for e in errors[:10])
        )
    by_hash: dict[str, Actor] = {}
    now = time.time()
    for index, entry in enumerate(data):
        rate_limits: dict[str, RateLimit] = {}
        for feature, spec in (entry.get("rateLimits") or {}).items():
            try:
                interval = parse_duration(spec["interval"])
            except ValueError as exc:
                raise StaticActorsError(f"[{index}.rateLimits.{feature}.interval] {exc}") from exc
            concurrent = spec.get("concurrentRequests") or percentage_concurrency(
                spec["limit"], interval, concurrency_percentage
            )
            rate_limits[feature] = RateLimit(
                allowed_models=tuple(spec.get("allowedModels", ["*"])),
                limit=spec["limit"],
                interval_s=interval,
                concurrent_requests=concurrent,
                concurrent_interval_s=concurrency_interval_s,
                tokens_limit=spec.get("tokensLimit"),
            )
        hashes = list(entry.get("tokens_sha256", []))
        if "token_sha256" in entry:
            hashes.append(entry["token_sha256"])
        if "token" in entry:
            hashes.append(token_sha256(entry["token"]))
        for digest in hashes:
            digest = digest.lower()
            if digest in by_hash:
                raise StaticActorsError(f"[{index}] token is already used by actor {by_hash[digest].id!r}")
            by_hash[digest] = Actor(
                id=entry["id"],
                name=entry.get("name", ""),
                source=source,
                access_enabled=entry.get("accessEnabled", True),
                endpoint_access=entry.get("endpointAccess") or {},
                rate_limits=rate_limits,
                last_updated=now,
                key=digest,
            )
    return by_hash


class StaticSource:
    name = "static"

    def __init__(self, path: Path, *, concurrency_percentage: float, concurrency_interval_s: float) -> None:
        self._path = path
        self._percentage = concurrency_percentage
        self._interval = concurrency_interval_s
        self._actors: dict[str, Actor] = {}
        self._mtime: float | None = None
        self.reloads = 0

    @property
    def path(self) -> Path:
        return self._path

    def load_initial(self) -> None:
        """Blocking first load at start-up; a missing file means no static actors."""
        if not self._path.exists():
            log.warning("static actors file %s does not exist; no static actors", self._path)
            self._actors = {}
            return
        self._mtime = self._path.stat().st_mtime
        self._actors = parse_actors_file(
            self._path.read_text(), source=self.name,
            concurrency_percentage=self._percentage, concurrency_interval_s=self._interval,
        )
        log.info("loaded %d static actor tokens from %s", len(self._actors), self._path)

    def _read_if_changed(self, force: bool) -> tuple[float, str] | None:
        try:
            mtime = self._path.stat().st_mtime
        except FileNotFoundError:
            return None
        if not force and mtime == self._mtime:
            return None
        return mtime, self._path.read_text()

    async def reload(self, *, force: bool = True) -> bool:
        """Re-read the file off the event loop; keep the old actors if the new file is bad."""
        loop = asyncio.get_running_loop()
        try:
            read = await loop.run_in_executor(None, self._read_if_changed, force)
        except OSError as exc:
            log.error("cannot read static actors file %s: %s", self._path, exc)
            return False
        if read is None:
            return False
        mtime, text = read
        try:
            actors = parse_actors_file(
                text, source=self.name, concurrency_percentage=self._percentage, concurrency_interval_s=self._interval
            )
        except StaticActorsError as exc:
            self._mtime = mtime
            log.error("static actors file %s rejected, keeping the previous actors: %s", self._path, exc)
            return False
        self._actors = actors
        self._mtime = mtime
        self.reloads += 1
        log.info("reloaded %d static actor tokens from %s", len(actors), self._path)
        return True

    async def sync(self) -> int:
        await self.reload(force=True)
        return len(self._actors)

    async def get(self, token: str) -> Actor:
        if not token:
            raise NotFromSource("no token provided")
        actor = self._actors.get(token_sha256(token))
        if actor is None:
            raise NotFromSource("no source found for token")
        return actor

