"""Soak: steady load for minutes, the gateway's RSS sampled all along; growth beyond 5% fails.

    python bench/soak.py --minutes 10
    python bench/soak.py --minutes 2 --stream-connections 50 --small-rate 100

The load is a steady mix, run concurrently from this process:
- paced streams (``--stream-connections`` of them, 60 tokens at 30 tokens/s, 2 s each,
  closed loop) - they exercise the streaming relay, the SSE parser and the curl handles;
- small non-streaming completions at a fixed ``--small-rate`` (open loop) - they
  churn through requests, spans, events and limiter calls.

RSS is read from /proc every ``--every`` seconds (the gateway and its workers). After
``--settle`` minutes (allocators and caches fill up first), the figure is the growth
from the median RSS of the first minute to the median of the last minute, in percent;
the growth of the peaks and a fitted trend (MB per 10 minutes) are printed too, since
RSS swings with the garbage collector's rhythm.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import loadtest, procinfo
from bench.stack import exit_on_sigterm, start_stack

MAX_GROWTH = 0.05


async def soak(args: argparse.Namespace, url: str, token: str, pid: int) -> tuple[list[tuple[float, int, float]], list[dict]]:
    total_s = args.minutes * 60
    streams = replace(
        loadtest.SCENARIOS["paced"], tokens=60, tokens_per_s=30, connections=args.stream_connections,
        duration_s=total_s, warmup_s=0.0, ramp_s=2.0, timeout_s=60.0,
    )  # fmt: skip
    small = replace(loadtest.SCENARIOS["small"], rate=args.small_rate, connections=20, duration_s=total_s, warmup_s=0.0)
    runners = [
        loadtest.Runner(loadtest.Options(url=url, scenario=s, token=token, progress=False))
        for s in (streams, small)
        if s.connections and (s.rate > 0 or s is streams)
    ]
    samples: list[tuple[float, int, float]] = []
    start = time.monotonic()

    async def sample() -> None:
        last_print = 0.0
        while True:
            s = procinfo.sample(pid)
            t = time.monotonic() - start
            samples.append((t, s.rss_bytes, s.cpu_s))
            if t - last_print >= 30 or not last_print:
                done = sum(r.stats.ok for r in runners)
                errors = sum(sum(r.stats.errors.values()) for r in runners)
                print(f"[{t:6.0f}s] gateway RSS {s.rss_bytes / 1e6:7.1f} MB  cpu {s.cpu_s:7.1f} s  requests {done}  errors {errors}",
                      file=sys.stderr, flush=True)  # fmt: skip
                last_print = t
            await asyncio.sleep(args.every)

    sampler = asyncio.ensure_future(sample())
    try:
        results = await asyncio.gather(*(r.run() for r in runners))
    finally:
        sampler.cancel()
    s = procinfo.sample(pid)
    samples.append((time.monotonic() - start, s.rss_bytes, s.cpu_s))
    return samples, list(results)


def _slope(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS against time, bytes per second."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_r = sum(r for _, r in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (r - mean_r) for t, r in points) / var if var else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--settle", type=float, default=2.0, help="minutes before the baseline is taken")
    p.add_argument("--every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--stream-connections", type=int, default=100)
    p.add_argument("--small-rate", type=float, default=100.0, help="non-streaming requests/s (0: none)")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--gateway-dir", type=Path)
    p.add_argument("--csv", type=Path, help="write every sample (t_s,rss_bytes,cpu_s) here")
    args = p.parse_args(argv)
    exit_on_sigterm()
    extra_env = dict(item.split("=", 1) for item in args.env)
    stack = start_stack(processes=args.processes, extra_env=extra_env, gateway_dir=args.gateway_dir)
    try:
        try:
            import uvloop

            samples, results = uvloop.run(soak(args, stack.gateway_url, stack.token, stack.gateway.pid))
        except ImportError:
            samples, results = asyncio.run(soak(args, stack.gateway_url, stack.token, stack.gateway.pid))
    finally:
        stack.stop()

    if args.csv:
        args.csv.write_text("t_s,rss_bytes,cpu_s\n" + "".join(f"{t:.1f},{rss},{cpu:.2f}\n" for t, rss, cpu in samples))
    settle_s = args.settle * 60
    total_s = samples[-1][0]
    # RSS oscillates by the collector's rhythm (tens of MB between passes with a
    # high gen-0 threshold): compare medians of a minute after the settling time
    # and of the last minute, and fit a line to everything after settling.
    after = [(t, rss) for t, rss, _ in samples if t >= settle_s] or [(t, rss) for t, rss, _ in samples]
    first_window = [rss for t, rss in after if t <= after[0][0] + 60]
    last_window = [rss for t, rss in after if t >= total_s - 60]
    baseline = statistics.median(first_window)
    final = statistics.median(last_window)
    growth = (final - baseline) / baseline
    peak_growth = (max(last_window) - max(first_window)) / max(first_window)
    slope_per_10min = _slope(after) * 600
    print(f"== soak: {args.minutes:g} min, {args.stream_connections} paced stream connections + {args.small_rate:g} small req/s, "
          f"{args.processes} gateway process(es), all features on")  # fmt: skip
    print(f"{'t (s)':>7}  {'RSS MB':>8}  {'CPU s':>8}")
    step = max(1, len(samples) // 20)
    for t, rss, cpu in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        print(f"{t:7.0f}  {rss / 1e6:8.1f}  {cpu:8.1f}")
    print()
    for r in results:
        print(loadtest.format_table(r))
        print()
    cpu_used = samples[-1][2] - samples[0][2]
    print(f"gateway CPU over the soak: {cpu_used:.1f} s ({100 * cpu_used / total_s:.0f}% of one core)")
    print(f"RSS median over the first minute after {args.settle:g} min: {baseline / 1e6:.1f} MB; over the last minute: "
          f"{final / 1e6:.1f} MB; growth {100 * growth:+.1f}% (peaks {100 * peak_growth:+.1f}%); "
          f"trend {slope_per_10min / 1e6:+.1f} MB per 10 min")  # fmt: skip
    verdict = "PASS" if growth <= MAX_GROWTH else "FAIL"
    print(f"[{verdict}] RSS growth over the soak <= 5%: {100 * growth:+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
