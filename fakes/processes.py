"""Real processes for tests: the gateway and the fake provider, started and always stopped.

Readiness is a log line matched with a deadline, never a sleep.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening on (http://[\w.\[\]:-]+:(\d+))")


class ManagedProcess:
    def __init__(self, args: list[str], *, env: Mapping[str, str] | None = None, cwd: Path = REPO, name: str = "process") -> None:
        self.name = name
        self.args = args
        self.lines: list[str] = []
        self._cond = threading.Condition()
        full_env = {**os.environ, **(env or {})}
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            args,
            cwd=str(cwd),
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = 20.0, start: int = 0) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index])
                    index += 1
                    if match:
                        return match
                if self.proc.poll() is not None and index >= len(self.lines):
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before {regex.pattern!r}:\n{self.output()[-4000:]}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.name}: no {regex.pattern!r} within {timeout}s:\n{self.output()[-4000:]}")
                self._cond.wait(min(remaining, 0.2))

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._close()

    def _close(self) -> None:
        self._reader.join(timeout=5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


class FakeProviderProcess:
    def __init__(self, extra_args: list[str] | None = None) -> None:
        self.process = ManagedProcess(
            [sys.executable, "-m", "fakes.provider", "--port", "0", *(extra_args or [])], name="fake provider"
        )
        match = self.process.wait_for(r"fake provider listening on (http://[\w.:-]+:\d+)")
        self.base_url = match.group(1)

    def stop(self) -> None:
        self.process.stop()


class GatewayProcess:
    """One ``python gateway.py`` with its own config, actors and event file."""

    def __init__(self, workdir: Path, env: Mapping[str, str], args: list[str] | None = None, name: str = "gateway") -> None:
        self.workdir = workdir
        self.events_path = Path(env.get("CODY_GATEWAY_EVENTS_FILE", workdir / "events.jsonl"))
        self.env = dict(env)
        self.process = ManagedProcess(
            [sys.executable, str(REPO / "gateway.py"), "--port", env.get("PORT", "0"), *(args or [])],
            env=self.env,
            cwd=workdir,
            name=name,
        )
        match = self.process.wait_for(LISTENING, timeout=30)
        self.base_url = match.group(1)
        self.port = int(match.group(2))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        out = []
        for line in self.events_path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            row["metadata"] = json.loads(row["metadata"]) if isinstance(row["metadata"], str) else row["metadata"]
            if name is None or row["name"] == name:
                out.append(row)
        return out

    def wait_events(self, count: int, name: str | None = None, timeout: float = 10.0) -> list[dict[str, Any]]:
        return wait_until(lambda: (lambda evs: evs if len(evs) >= count else None)(self.events(name)), timeout, what=f"{count} {name or ''} events")

    def stop(self) -> int:
        return self.process.stop()

    def kill(self) -> None:
        self.process.kill()


def write_actors(path: Path, actors: list[dict[str, Any]]) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(actors))
    tmp.replace(path)
    return path


def iter_sse(lines: Iterator[bytes]) -> Iterator[tuple[str, str]]:
    event, data = "", []
    for raw in lines:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
