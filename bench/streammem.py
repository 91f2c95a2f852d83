"""Where a gateway's memory per open stream goes, by Python allocation site.

    python bench/streammem.py --streams 500              # tracemalloc: Python objects per open stream
    python bench/streammem.py --streams 2000 --no-trace  # RSS alone (tracemalloc off)

Starts the full stack (bench/stack.py) with the gateway under bench/memtrace.py,
takes a baseline once the gateway is warm, opens ``--streams`` slow streams
through it (bench/loadtest.py, scenario idle), and while they are all open
takes a second snapshot: RSS growth per open stream next to the traced
(Python) growth per open stream and its top allocation sites, so that the
difference is what C code holds (libcurl, the allocator). tracemalloc slows the
gateway several-fold: keep ``--streams`` to a few hundred with it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procinfo import sample
from bench.stack import REPO, exit_on_sigterm, start_stack


def _open_streams(url: str, token: str, streams: int, tokens: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable, str(REPO / "bench" / "loadtest.py"), "--url", url, "--token", token,
            "--scenario", "idle", "--connections", str(streams), "--tokens", str(tokens), "--quiet",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _dump(pid: int, out: Path, n: int, timeout_s: float) -> str:
    os.kill(pid, signal.SIGUSR1)
    path = out / f"memtrace-{n}.txt"
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text().strip():
        if time.monotonic() > deadline:
            raise SystemExit(f"no {path} within {timeout_s}s")
        time.sleep(0.2)
    time.sleep(0.5)  # the file is written in one call; let it finish
    return path.read_text()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=500)
    p.add_argument("--tokens", type=int, default=120, help="at 2 tokens/s: how long each stream stays open")
    p.add_argument("--settle", type=float, default=8.0, help="seconds after opening before the reading")
    p.add_argument("--gateway-dir", type=Path, help="run the gateway from this checkout (e.g. a snapshot of HEAD)")
    p.add_argument("--no-trace", action="store_true", help="RSS only, gateway without tracemalloc")
    args = p.parse_args()
    exit_on_sigterm()
    out = Path(os.environ.get("BENCH_MEMTRACE_OUT") or f"/tmp/streammem-{os.getpid()}")
    out.mkdir(parents=True, exist_ok=True)
    prefix = None if args.no_trace else [sys.executable, str(REPO / "bench" / "memtrace.py")]
    stack = start_stack(extra_env={"BENCH_MEMTRACE_OUT": str(out)}, gateway_prefix=prefix, gateway_dir=args.gateway_dir)
    try:
        pid = stack.gateway.pid
        # Warm: one short stream, so that lazily built things are in the baseline.
        warm = _open_streams(stack.gateway_url, stack.token, 5, 4)
        warm.wait(60)
        if not args.no_trace:
            _dump(pid, out, 0, 60)
        before = sample(pid).rss_bytes
        load = _open_streams(stack.gateway_url, stack.token, args.streams, args.tokens)
        time.sleep(args.settle)
        during = sample(pid).rss_bytes
        text = "" if args.no_trace else _dump(pid, out, 1, 300)
        rss_kb = (during - before) / 1024 / args.streams
        print(f"{args.streams} streams: RSS {before / 1e6:.1f} -> {during / 1e6:.1f} MB, {rss_kb:.1f} KB per open stream")
        if text:
            for line in text.splitlines():
                if line.startswith("growth since baseline by"):
                    mb = float(line.rsplit(":", 1)[1].split()[0])
                    print(f"{line.strip()} = {mb * 1e6 / 1024 / args.streams:.1f} KB per open stream")
            print(text)
        load.terminate()
        load.wait(30)
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
