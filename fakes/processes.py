"""Real processes for the tests and the benchmarks: started, waited for, and always stopped.

One harness for both (tests/conftest.py and bench/stack.py): a child process whose
output is kept either in memory (a reader thread; tests read it back) or in a log
file (benchmarks: no thread in the load generator's process, and a pipe that
nobody reads fast enough would throttle the child). Readiness is a line of that
output matched with a deadline, never a sleep; stopping is SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening on (http://[\w.\[\]:-]+:(\d+))")
FAKE_PROVIDER_LISTENING = re.compile(r"fake provider listening on (http://[\w.:-]+:\d+)")
_POLL_S = 0.05  # how often a log file is re-read while waiting for a line


class ProcessExited(RuntimeError):
    """The process ended before what was waited for."""


class NotReady(TimeoutError):
    """The deadline passed before what was waited for."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ManagedProcess:
    """One child process; stdout and stderr together, in memory or (``log_path``) in a file."""

    def __init__(
        self,
        args: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO,
        name: str = "process",
        log_path: Path | None = None,
    ) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._log: IO[bytes] | None = None
        self._reader: threading.Thread | None = None
        # Bytes when the output goes to log_path, text when _read() collects it.
        self.proc: subprocess.Popen[Any]
        full_env = {**os.environ, **(env or {})}
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if log_path is not None:
            self._log = open(log_path, "wb")  # noqa: SIM115  (open as long as the process; closed by stop/kill)
            try:
                self.proc = subprocess.Popen(
                    args, cwd=str(cwd), env=full_env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            except BaseException:
                self._log.close()
                raise
            return
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
        self._reader = threading.Thread(target=self._read, name=f"{name} output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def lines(self) -> list[str]:
        """The output so far, one string per line (a copy)."""
        if self.log_path is not None:
            return self.output().splitlines()
        with self._cond:
            return list(self._lines)

    def output(self) -> str:
        if self.log_path is not None:
            try:
                return self.log_path.read_text(errors="replace")
            except OSError:
                return ""
        with self._cond:
            return "\n".join(self._lines)

    def _failure(self, kind: type[Exception], what: str) -> Exception:
        return kind(f"{self.name}: {what}:\n{self.output()[-4000:]}")

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = 20.0, start: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` in an output line from line ``start`` on, within ``timeout`` seconds."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        if self.log_path is not None:
            return self._wait_for_in_file(regex, deadline, timeout, start)
        index = start
        with self._cond:
            while True:
                while index < len(self._lines):
                    match = regex.search(self._lines[index])
                    index += 1
                    if match:
                        return match
                if self.proc.poll() is not None and (self._reader is None or not self._reader.is_alive()) and index >= len(self._lines):
                    raise self._failure(ProcessExited, f"exited ({self.proc.returncode}) before {regex.pattern!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._failure(NotReady, f"no {regex.pattern!r} within {timeout}s")
                self._cond.wait(min(remaining, 0.2))

    def _wait_for_in_file(self, regex: re.Pattern[str], deadline: float, timeout: float, start: int) -> re.Match[str]:
        assert self.log_path is not None
        index, offset, partial = 0, 0, b""
        with open(self.log_path, "rb") as log:
            while True:
                exited = self.proc.poll() is not None  # before the read: the last lines are in the file by then
                log.seek(offset)
                data = log.read()
                offset += len(data)
                *complete, partial = (partial + data).split(b"\n")
                if exited and partial:
                    complete.append(partial)
                    partial = b""
                for raw in complete:
                    index += 1
                    if index > start:
                        match = regex.search(raw.decode(errors="replace"))
                        if match:
                            return match
                if exited:
                    raise self._failure(ProcessExited, f"exited ({self.proc.returncode}) before {regex.pattern!r}")
                if time.monotonic() > deadline:
                    raise self._failure(NotReady, f"no {regex.pattern!r} within {timeout}s")
                time.sleep(_POLL_S)

    def wait_until(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        """Polls ``condition`` until it is truthy; fails early if the process ends."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if self.proc.poll() is not None:
                raise self._failure(ProcessExited, f"exited ({self.proc.returncode}) before {what}")
            if time.monotonic() > deadline:
                raise self._failure(NotReady, f"no {what} within {timeout}s")
            time.sleep(_POLL_S)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit status."""
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
        if self._log is not None:
            self._log.close()
        if self._reader is not None:
            self._reader.join(timeout=5)
            if self.proc.stdout is not None and not self._reader.is_alive():
                self.proc.stdout.close()


def start_server(
    args: list[str],
    *,
    name: str,
    ready: re.Pattern[str] | str,
    timeout: float = 20.0,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path = REPO,
) -> tuple[ManagedProcess, re.Match[str]]:
    """Starts a process and waits for its ``ready`` line; stopped again if that line never comes."""
    process = ManagedProcess(args, env=env, cwd=cwd, name=name, log_path=log_path)
    try:
        return process, process.wait_for(ready, timeout)
    except BaseException:
        process.stop(5)
        raise


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
    def __init__(self, extra_args: list[str] | None = None, *, log_path: Path | None = None, cwd: Path = REPO) -> None:
        self.process, match = start_server(
            [sys.executable, "-m", "fakes.provider", "--port", "0", *(extra_args or [])],
            name="fake provider",
            ready=FAKE_PROVIDER_LISTENING,
            log_path=log_path,
            cwd=cwd,
        )
        self.base_url = match.group(1)

    def stop(self) -> None:
        self.process.stop()


class GatewayProcess:
    """One ``python gateway.py`` with its own config, actors and event file."""

    def __init__(self, workdir: Path, env: Mapping[str, str], args: list[str] | None = None, name: str = "gateway") -> None:
        self.workdir = workdir
        self.events_path = Path(env.get("CODY_GATEWAY_EVENTS_FILE", workdir / "events.jsonl"))
        self.env = dict(env)
        self.process, match = start_server(
            [sys.executable, str(REPO / "gateway.py"), "--port", env.get("PORT", "0"), *(args or [])],
            name=name,
            ready=LISTENING,
            timeout=30,
            env=self.env,
            cwd=workdir,
        )
        self.base_url = match.group(1)
        self.port = int(match.group(2))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        out: list[dict[str, Any]] = []
        for line in self.events_path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            row["metadata"] = json.loads(row["metadata"]) if isinstance(row["metadata"], str) else row["metadata"]
            if name is None or row["name"] == name:
                out.append(row)
        return out

    def wait_events(self, count: int, name: str | None = None, timeout: float = 10.0) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            events = self.events(name)
            return events if len(events) >= count else None

        return wait_until(enough, timeout, what=f"{count} {name or ''} events")

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
    event = ""
    data: list[str] = []
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
