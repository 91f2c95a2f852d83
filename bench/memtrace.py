"""Run a Python program with tracemalloc on; SIGUSR1 writes where the memory is.

    python bench/memtrace.py gateway.py --port 0        (BENCH_MEMTRACE_OUT=dir)

The first SIGUSR1 takes a baseline snapshot; each later one writes, to
``$BENCH_MEMTRACE_OUT/memtrace-N.txt``, the traced total and the top allocation
sites by growth since the baseline, so that (RSS growth - traced growth) is what
C code (curl, OpenSSL, the allocator's fragmentation) holds. Used by
``bench/profile.py --memory``; far slower than a normal run, for memory only.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

_FRAMES = 6


def _install(out_dir: Path) -> None:
    state: dict[str, object] = {"n": 0, "base": None}

    def dump(signum: int, frame: FrameType | None) -> None:
        snap = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>"))
        )
        n = int(state["n"])  # type: ignore[call-overload]
        state["n"] = n + 1
        base = state["base"]
        traced, peak = tracemalloc.get_traced_memory()
        lines = [f"traced now {traced / 1e6:.1f} MB (peak {peak / 1e6:.1f} MB)"]
        if base is None:
            state["base"] = snap
            lines.append("baseline taken")
        else:
            assert isinstance(base, tracemalloc.Snapshot)
            for key in ("filename", "lineno"):
                diffs = snap.compare_to(base, key)
                growth = sum(d.size_diff for d in diffs)
                lines.append(f"\ngrowth since baseline by {key}: {growth / 1e6:.2f} MB")
                for d in diffs[:30]:
                    tb = d.traceback[0]
                    lines.append(f"  {d.size_diff / 1024:10.1f} KB  {d.count_diff:+8d} blocks  {tb.filename}:{tb.lineno}")
            lines.append("\ntop growth by call stack:")
            for d in snap.compare_to(base, "traceback")[:12]:
                lines.append(f"  {d.size_diff / 1024:10.1f} KB  {d.count_diff:+8d} blocks")
                for tb in list(d.traceback)[-_FRAMES:]:
                    lines.append(f"        {tb.filename}:{tb.lineno}")
        (out_dir / f"memtrace-{n}.txt").write_text("\n".join(lines) + "\n")

    signal.signal(signal.SIGUSR1, dump)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: memtrace.py SCRIPT [ARGS...]")
    out_dir = Path(os.environ.get("BENCH_MEMTRACE_OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(_FRAMES)
    _install(out_dir)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
