"""Summarise py-spy's raw (collapsed) output: where the samples went.

    py-spy record -p PID -f raw -o out.txt ...
    python bench/pyspy_summary.py out.txt [--top 25]

Prints, over all non-idle samples of every thread:
- the share of samples per thread;
- the top functions by self time (the innermost frame of a sample);
- the top functions by inclusive time (any frame of a sample, counted once);
- the share per area (our packages, Tornado, curl, redis-py, OpenTelemetry,
  asyncio/uvloop, the standard library, ...), by self time.

A function is named ``Qualified.name (path/file.py)``: line numbers are
dropped so one function's samples add up.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")

# First match wins; paths in py-spy's output are shortened (site-packages removed).
AREAS: tuple[tuple[str, str], ...] = (
    ("handlers/", "gateway: handlers"),
    ("upstreams/", "gateway: upstreams"),
    ("limiter/", "gateway: limiter"),
    ("telemetry/", "gateway: telemetry"),
    ("actors/", "gateway: actors"),
    ("conf/", "gateway: conf"),
    ("gateway.py", "gateway: entry"),
    ("composition.py", "gateway: entry"),
    ("tornado/curl_httpclient", "tornado curl client"),
    ("tornado/", "tornado"),
    ("pycurl", "pycurl"),
    ("redis/", "redis-py"),
    ("opentelemetry/", "opentelemetry"),
    ("google/protobuf", "protobuf"),
    ("prometheus_client/", "prometheus-client"),
    ("sentry_sdk/", "sentry"),
    ("requests/", "requests (otlp export)"),
    ("urllib3/", "urllib3 (otlp export)"),
    ("logging/", "logging"),
    ("asyncio/", "asyncio"),
    ("uvloop", "uvloop"),
    ("json/", "json"),
    ("bpe", "tokenizer"),
    ("tiktoken", "tokenizer"),
)


def area(file: str) -> str:
    for needle, name in AREAS:
        if needle in file:
            return name
    return "stdlib/other" if file else "native"


@dataclass
class Profile:
    total: int = 0
    threads: Counter[str] = field(default_factory=Counter)
    self_time: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    areas: Counter[str] = field(default_factory=Counter)


def _name(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip(), ""
    return f"{match['func']} ({match['file']})", match["file"]


def parse(lines: list[str]) -> Profile:
    prof = Profile()
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0]
        # "thread (1234): MainThread" -> "MainThread"; keep the name only.
        thread_name = thread.split(": ", 1)[-1] if thread.startswith("thread") else thread
        body = frames[1:] if thread.startswith(("thread", "process")) else frames
        if body and body[0].startswith("thread"):
            thread_name = body[0].split(": ", 1)[-1]
            body = body[1:]
        if not body:
            continue
        prof.total += count
        prof.threads[thread_name] += count
        leaf, leaf_file = _name(body[-1])
        prof.self_time[leaf] += count
        prof.areas[area(leaf_file)] += count
        for name in {_name(f)[0] for f in body}:
            prof.inclusive[name] += count
    return prof


def render(prof: Profile, top: int = 25, title: str = "") -> str:
    if prof.total == 0:
        return "no samples"
    out: list[str] = []
    if title:
        out.append(f"== {title} ==")
    out.append(f"{prof.total} samples (non-idle)")

    def table(header: str, counter: Counter[str], n: int) -> None:
        out.append("")
        out.append(header)
        for name, count in counter.most_common(n):
            out.append(f"  {100 * count / prof.total:5.1f}%  {name}")

    table("threads", prof.threads, 10)
    table("by area (self time)", prof.areas, 20)
    table(f"top {top} by self time", prof.self_time, top)
    table(f"top {top} by inclusive time", prof.inclusive, top)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", nargs="+", type=Path, help="py-spy raw output file(s), summed")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    lines: list[str] = []
    for path in args.raw:
        lines.extend(path.read_text(errors="replace").splitlines())
    print(render(parse(lines), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
