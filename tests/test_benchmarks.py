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


def test_throughput_ratios_are_taken_within_each_round(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import throughput

    def run(tokens, seconds):
        return {"tokens": tokens, "train_seconds": seconds}

    # The VM ran twice as fast in round 2: across rounds, 300 / 50 would read as 6x; within them it is 2x and 3x.
    rounds = [
        {"smolfactory-packed": run(300, 2), "trl-default": run(150, 2), "trl-best": run(100, 1)},
        {"smolfactory-packed": run(300, 1), "trl-default": run(100, 1)},  # trl-best failed in this round
    ]
    assert throughput.paired_ratios(rounds, "smolfactory-packed", "trl-default") == [2.0, 3.0]
    assert throughput.paired_ratios(rounds, "smolfactory-packed", "trl-best") == [1.5]
    throughput.print_medians(rounds)
    table = capsys.readouterr().out
    assert "| smolfactory-packed | 225 (150-300) | 2.50x (2.00-3.00) | 1.50x (1.50-1.50) |" in table
    assert "| trl-best | 100 (100-100) | 1.33x (1.33-1.33) | 1.00x (1.00-1.00) |" in table  # 100 / 75 in round 1


def test_throughput_refuses_a_run_named_twice():
    """Results are kept by run name: a second run of one name would replace the first without a word."""
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--runs", "trl-best", "trl-best"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--runs names a run twice" in done.stderr and "--rounds" in done.stderr
