"""bench/curlmem.py runs and prints its figures (a tiny run: the harness, not a benchmark)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("via", ["transport", "tornado"])
def test_curlmem_measures_open_transfers(via: str) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/curlmem.py", "--streams", "20", "--max-clients", "40", "--via", via, "--trace"],
        cwd=REPO, capture_output=True, text=True, timeout=80, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = dict(part.split("=", 1) for part in proc.stdout.strip().splitlines()[-1].split())
    assert float(figures["kb_per_transfer"]) > 0
    assert float(figures["python_kb_per_transfer"]) > 0
