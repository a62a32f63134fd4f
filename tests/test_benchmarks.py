"""The CPU benchmark scripts run as the README invokes them (tiny settings): a script that no longer matches the
package's API fails here, not in a user's hands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True], ids=["as-fit-runs", "masked"])
def test_batching_benchmark_runs_and_packed_examples_stay_apart(masked):
    command = [sys.executable, "benchmarks/batching.py", "--batches", "1", "--batch-size", "2", "--max-length", "128"]
    command += ["--attn", "sdpa", *(["--masked"] if masked else [])]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    modes = re.findall(r"^\| (padded|grouped|packed) \| (\d+) \|", done.stdout, flags=re.MULTILINE)
    assert [mode for mode, _ in modes] == ["padded", "grouped", "packed"] and all(int(speed) > 0 for _, speed in modes)
    isolation = re.search(r"^\| sdpa \| [\d.]+ \| ([\d.]+) \| ([\d.e+-]+) \|", done.stdout, flags=re.MULTILINE)
    alone, difference = isolation.groups()  # the examples' loss one by one, and the packed loss's distance to it
    assert 0.5 < float(alone) < 5 and float(difference) < 1e-4, done.stdout
