#!/usr/bin/env bash
# The GPU check in one call (issue 27): hf vs vLLM greedy parity, steering on every entry point, capture parity and
# the bench ratios on a random-weight 7B-shape model (no downloads); last line key=value. See scripts/gpu_check.py.
# On a machine without CUDA it says so in one line and exits 0. Runs with .venv's python where there is one, else
# python3 with src/ on its path (a lent GPU machine's image: carry emlens's missing dependencies as wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"; fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu-check: needs CUDA (no nvidia-smi here); nothing was run"
  exit 0
fi
exec timeout 480 "$python" scripts/gpu_check.py
