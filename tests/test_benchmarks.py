"""The CPU benchmark scripts run as the README invokes them (tiny settings): a script that no longer matches the
package's API fails here, not in a user's hands."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def benchmark_module(name: str) -> ModuleType:
    """A script of benchmarks/ imported as a module (they are scripts, not a package)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module(name)


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True], ids=["as-fit-runs", "masked"])
def test_batching_benchmark_runs_and_packed_examples_stay_apart(masked, tiny_model_dir):
    # As fit runs, on the real model (its loss is a trained model's); masked sdpa, on the tiny model (half a minute
    # less; what it checks is that the mask keeps the packed examples apart).
    command = [sys.executable, "benchmarks/batching.py", "--batches", "1", "--batch-size", "2", "--max-length", "128"]
    command += ["--attn", "sdpa", *(["--model", tiny_model_dir, "--masked"] if masked else [])]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    modes = re.findall(r"^\| (padded|grouped|packed) \| (\d+) \|", done.stdout, flags=re.MULTILINE)
    assert [mode for mode, _ in modes] == ["padded", "grouped", "packed"] and all(int(speed) > 0 for _, speed in modes)
    isolation = re.search(r"^\| sdpa \| [\d.]+ \| ([\d.]+) \| ([\d.e+-]+) \|", done.stdout, flags=re.MULTILINE)
    alone, difference = isolation.groups()  # the examples' loss one by one, and the packed loss's distance to it
    # The tiny model is random: its loss is near log(49,152) = 10.8, the trained model's between 0.5 and 5.
    low, high = (8, 13) if masked else (0.5, 5)
    assert low < float(alone) < high and float(difference) < 1e-4, done.stdout


def test_throughput_ratios_are_taken_within_each_round(capsys):
    throughput = benchmark_module("throughput")

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


def test_throughput_refuses_a_run_named_twice(monkeypatch, capsys):
    """Results are kept by run name: a second run of one name would replace the first without a word."""
    throughput = benchmark_module("throughput")
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--runs", "trl-best", "trl-best"])
    with pytest.raises(SystemExit) as exit_info:
        throughput.main()  # the command's own code, in this process: a subprocess spent 12 s importing torch
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--runs names a run twice" in stderr and "--rounds" in stderr
