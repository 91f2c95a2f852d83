"""What Tornado + curl_httpclient cost on their own: the fake provider direct vs a bare relay.

Runs the same scenario against the fake provider and through bench/floor_proxy.py
(the design card's server and HTTP client with no gateway feature), alternating,
several rounds, and prints the throughput ratio, the relay's CPU per request and
the added latency. Put next to bench/compare.py's figures for the gateway, it
splits the gateway's cost into "framework and client" and "features".

    python bench/floor.py --scenario small --rounds 3 --duration 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import loadtest
from bench.stack import REPO, exit_on_sigterm, start_fake_provider
from fakes.processes import ManagedProcess, start_server


def start_floor_proxy(workdir: Path, upstream: str) -> tuple[ManagedProcess, str]:
    proc, match = start_server(
        [sys.executable, str(REPO / "bench" / "floor_proxy.py"), "--port", "0", "--upstream", upstream],
        name="floor proxy",
        ready=r"floor proxy listening on (http://[\w.:-]+:\d+)",
        log_path=workdir / "floor_proxy.log",
    )
    return proc, match.group(1)


def _run(url: str, pid: int, scenario: loadtest.Scenario, quiet: bool) -> dict[str, Any]:
    return loadtest.run(loadtest.Options(url=url, scenario=scenario, kind="provider", pid=pid, progress=not quiet))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="small", choices=sorted(loadtest.SCENARIOS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=0, help="0: the scenario's own")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop at this many requests/s (0: closed loop)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    scenario = replace(loadtest.SCENARIOS[args.scenario], duration_s=args.duration)
    if args.connections:
        scenario = replace(scenario, connections=args.connections)
    if args.rate:
        scenario = replace(scenario, rate=args.rate)
    with tempfile.TemporaryDirectory(prefix="gw-floor-") as tmp:
        workdir = Path(tmp)
        fake, fake_url = start_fake_provider(workdir)
        proxy, proxy_url = start_floor_proxy(workdir, fake_url)
        try:
            rows = []
            for n in range(args.rounds):
                order = ("direct", "relay") if n % 2 == 0 else ("relay", "direct")
                pair: dict[str, dict[str, Any]] = {}
                for side in order:
                    print(f"round {n + 1}/{args.rounds}: {side} ...", file=sys.stderr, flush=True)
                    url, pid = (fake_url, fake.pid) if side == "direct" else (proxy_url, proxy.pid)
                    pair[side] = _run(url, pid, scenario, args.quiet)
                    time.sleep(0.5)
                rows.append(pair)
        finally:
            proxy.stop()
            fake.stop()
    print(f"== floor: {args.scenario}; bare Tornado + curl_httpclient relay vs the fake provider direct; {args.rounds} rounds")
    print(f"{'round':>5} {'direct req/s':>13} {'relay req/s':>12} {'ratio':>7} {'relay ms CPU/req':>17} {'added p50 ms':>13} {'added p99 ms':>13}")
    ratios, cpus = [], []
    for n, pair in enumerate(rows, 1):
        d, r = pair["direct"], pair["relay"]
        ratio = r["requests_per_s"] / d["requests_per_s"] if d["requests_per_s"] else float("nan")
        cpu = (r.get("gateway") or {}).get("cpu_per_request_ms") or float("nan")
        added = (r["latency_s"]["p50"] - d["latency_s"]["p50"]) * 1000
        added99 = (r["latency_s"]["p99"] - d["latency_s"]["p99"]) * 1000
        ratios.append(ratio)
        cpus.append(cpu)
        print(f"{n:>5} {d['requests_per_s']:>13.1f} {r['requests_per_s']:>12.1f} {ratio:>7.3f} {cpu:>17.3f} {added:>13.2f} {added99:>13.2f}")
    print(f"throughput ratio relay/direct: {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"relay CPU per request: {statistics.median(cpus):.3f} ms (min {min(cpus):.3f}, max {max(cpus):.3f})")
    per_stream = [(pair["relay"].get("gateway") or {}).get("rss_per_open_stream_bytes") for pair in rows]
    if scenario.stream and all(per_stream):
        kb = [value / 1024 for value in per_stream if value]
        print(f"relay RSS per open stream: {statistics.median(kb):.1f} KB (min {min(kb):.1f}, max {max(kb):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
