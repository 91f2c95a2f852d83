"""CPU time and memory of a process tree, read from /proc (Linux only, no psutil).

The gateway may pre-fork workers, so every figure covers the process and all
of its descendants. Children that exit during a run take their CPU time with
them (it moves to the parent's cutime only once reaped), which is why callers
sample before and after a run rather than trusting one reading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class TreeSample:
    cpu_s: float  # user + system seconds of every live process in the tree
    rss_bytes: int  # summed resident set size now
    pids: tuple[int, ...]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            text = (task / "children").read_text()
        except OSError:
            continue
        out.extend(int(p) for p in text.split())
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    seen: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.append(current)
        stack.extend(_children(current))
    return seen


def _cpu_and_rss(pid: int) -> tuple[float, int] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    rss_pages = int(fields[21])
    return (utime + stime) / _TICKS, rss_pages * _PAGE


def sample(pid: int) -> TreeSample:
    cpu = 0.0
    rss = 0
    pids: list[int] = []
    for p in tree(pid):
        got = _cpu_and_rss(p)
        if got is None:
            continue
        cpu += got[0]
        rss += got[1]
        pids.append(p)
    return TreeSample(cpu_s=cpu, rss_bytes=rss, pids=tuple(pids))


def self_cpu_s() -> float:
    """CPU seconds of the calling process (the load generator's own cost)."""
    times = os.times()
    return times.user + times.system


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds of ``pid`` alone (not its descendants); None once it is gone."""
    got = _cpu_and_rss(pid)
    return None if got is None else got[0]
