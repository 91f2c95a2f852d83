"""Peers: other gateways run through the same scenarios as ours, in the same rounds (bench/compare.py --peer).

A peer is a process started next to the benchmark stack and pointed at the same
fake provider. It is told how requests must be shaped for it (``kind``, as in
bench/loadtest.py: ``provider`` for the fake provider's Anthropic route, ``openai``
for an OpenAI-compatible ``/v1/chat/completions``), gets a free 127.0.0.1 port, and
is ready when its output shows a line, waited for with a deadline.

Built in:
  litellm   LiteLLM's proxy, installed by this script in its own virtualenv
            (``$GATEWAY_BENCH_CACHE`` or ~/.cache/gateway-bench, ``litellm-venv``),
            its models pointed at the fake provider's OpenAI routes
            (``openai/<model>``, ``api_base`` = the fake's ``/v1``).
  floor     bench/floor_proxy.py, the bare Tornado + curl relay (no install):
            the design card's parts and nothing else.
A command of your own: ``--peer-command 'CMD {port} {fake_url}'`` (also ``{python}``,
``{repo}``, ``{workdir}``; run in the work directory) with ``--peer-kind`` and
``--peer-ready REGEX``.

    python bench/peers.py install litellm      # just the install, e.g. ahead of a run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fakes.processes import REPO, ManagedProcess, free_port, start_server

LITELLM_REQUIREMENT = "litellm[proxy]"
INSTALL_TIMEOUT_S = 900.0
# The model names the scenarios send (bench/loadtest.py), served by the peer.
CHAT_MODEL = "claude-3-haiku-20240307"
EMBEDDINGS_MODEL = "text-embedding-ada-002"


class PeerError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("GATEWAY_BENCH_CACHE") or Path.home() / ".cache" / "gateway-bench")


@dataclass
class RunningPeer:
    name: str
    kind: str
    url: str
    token: str
    process: ManagedProcess

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.stop()


@dataclass
class Peer:
    """How to install (once), configure and start one peer."""

    name: str
    kind: str  # bench/loadtest.py's request shape: "provider" or "openai"
    command: Callable[[Path, str, int], list[str]]  # (workdir, fake_url, port) -> argv
    ready: re.Pattern[str]
    install: Callable[[], None] = lambda: None
    env: dict[str, str] = field(default_factory=dict)
    start_timeout_s: float = 60.0
    token: str = "bench-peer"

    def start(self, workdir: Path, fake_url: str) -> RunningPeer:
        self.install()
        port = free_port()
        process, _ = start_server(
            self.command(workdir, fake_url, port),
            name=self.name,
            ready=self.ready,
            log_path=workdir / f"peer-{self.name}.log",
            env=self.env,
            cwd=workdir,
            timeout=self.start_timeout_s,
        )
        return RunningPeer(self.name, self.kind, f"http://127.0.0.1:{port}", self.token, process)


# -- LiteLLM -----------------------------------------------------------------------


def litellm_venv() -> Path:
    return cache_dir() / "litellm-venv"


def install_litellm(venv: Path | None = None, timeout_s: float = INSTALL_TIMEOUT_S) -> Path:
    """``python3 -m venv`` + ``pip install 'litellm[proxy]'``, once; returns the ``litellm`` executable."""
    venv = venv or litellm_venv()
    exe = venv / "bin" / "litellm"
    marker = venv / ".installed"
    if exe.exists() and marker.exists():
        return exe
    deadline = time.monotonic() + timeout_s
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", LITELLM_REQUIREMENT],
    ]
    print(f"installing {LITELLM_REQUIREMENT} into {venv} (once; may take minutes) ...", file=sys.stderr, flush=True)
    for step in steps:
        left = deadline - time.monotonic()
        try:
            done = subprocess.run(step, check=False, capture_output=True, text=True, timeout=max(1.0, left), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise PeerError(f"LiteLLM install did not finish within {timeout_s:.0f}s: {shlex.join(step)}") from exc
        if done.returncode != 0:
            raise PeerError(f"LiteLLM install failed ({done.returncode}): {shlex.join(step)}\n{(done.stdout + done.stderr)[-3000:]}")
    if not exe.exists():
        raise PeerError(f"{LITELLM_REQUIREMENT} installed no {exe}")
    marker.write_text(LITELLM_REQUIREMENT + "\n")
    return exe


def litellm_config(fake_url: str, master_key: str) -> dict[str, object]:
    """The scenarios' models, served by the fake provider's OpenAI routes; no logging, no callbacks, no database.

    A master key as in any deployment (the proxy refuses to start without one):
    every request is authenticated, as the gateway's are.
    """
    api_base = fake_url.rstrip("/") + "/v1"
    params = {"api_base": api_base, "api_key": "bench-upstream-key"}
    return {
        "model_list": [
            {"model_name": CHAT_MODEL, "litellm_params": {"model": f"openai/{CHAT_MODEL}", **params}},
            {"model_name": EMBEDDINGS_MODEL, "litellm_params": {"model": f"openai/{EMBEDDINGS_MODEL}", **params}},
        ],
        "litellm_settings": {"drop_params": True, "num_retries": 0, "request_timeout": 600, "telemetry": False},
        "general_settings": {"master_key": master_key},
    }


def _litellm_command(master_key: str) -> Callable[[Path, str, int], list[str]]:
    def command(workdir: Path, fake_url: str, port: int) -> list[str]:
        config = workdir / "litellm-config.yaml"
        # JSON is YAML: no yaml package needed on this side.
        config.write_text(json.dumps(litellm_config(fake_url, master_key), indent=2))
        exe = litellm_venv() / "bin" / "litellm"
        return [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]

    return command


def _install_litellm() -> None:
    install_litellm()


def litellm_peer() -> Peer:
    master_key = "sk-bench-" + secrets.token_hex(24)
    return Peer(
        name="litellm",
        kind="openai",
        command=_litellm_command(master_key),
        token=master_key,
        ready=re.compile(r"Uvicorn running on http://127\.0\.0\.1:\d+"),
        install=_install_litellm,
        env={
            # The price map ships with the package: no fetch at start-up. Logging stays at
            # LiteLLM's default (an access line per request, as the gateway writes):
            # a quieter LITELLM_LOG also hides the "Uvicorn running" line waited for.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_TELEMETRY": "False",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        },
        start_timeout_s=180.0,
    )


# -- the bare relay and commands of one's own ---------------------------------------


def _floor_command(workdir: Path, fake_url: str, port: int) -> list[str]:
    return [sys.executable, str(REPO / "bench" / "floor_proxy.py"), "--port", str(port), "--upstream", fake_url]


def floor_peer() -> Peer:
    return Peer(name="floor", kind="provider", command=_floor_command, ready=re.compile(r"floor proxy listening on http://"))


def command_peer(template: str, *, name: str = "custom", kind: str = "provider", ready: str = r"listening on") -> Peer:
    """``template`` is a shell-like command line run in the work directory; ``{port}``, ``{fake_url}``,
    ``{python}``, ``{repo}`` (this checkout) and ``{workdir}`` are filled in."""

    def command(workdir: Path, fake_url: str, port: int) -> list[str]:
        values = {"port": str(port), "fake_url": fake_url, "python": sys.executable, "repo": str(REPO), "workdir": str(workdir)}
        return [part.format(**values) for part in shlex.split(template)]

    return Peer(name=name, kind=kind, command=command, ready=re.compile(ready))


BUILTIN: dict[str, Callable[[], Peer]] = {"litellm": litellm_peer, "floor": floor_peer}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser("install", help="install a peer that needs it (litellm)")
    install.add_argument("peer", choices=["litellm"])
    args = parser.parse_args(argv)
    if args.command == "install":
        print(install_litellm())
    return 0


if __name__ == "__main__":
    sys.exit(main())
