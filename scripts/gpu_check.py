"""The GPU check in one call (`scripts/gpu-check.sh`): on a CUDA machine with no model downloads, a random-weight
model of a real 7B shape, then for each engine installed (hf always, vLLM where it imports):

- greedy parity between the engines (share of prompts with the same tokens);
- steering applied on every entry point (generation, activation capture, next-token log-probabilities): an
  AddVector at scale 0 leaves the output as it was, a large scale changes it;
- capture parity between the engines (largest relative difference of the captured residuals);
- the throughput ratios of `emlens bench generate` (batch 32 over 1) and `emlens bench steer` (steered over plain).

The last line is `key=value` pairs. Without CUDA it says so in one line and exits 0; `--cpu --shape tiny` runs
the same checks on the CPU (the test of this script).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPE = "qwen2.5-7b"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=SHAPE)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (to check this script)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("gpu-check: needs CUDA (no GPU here); nothing was run")
        return
    check(args.shape, "cpu" if args.cpu else "cuda")


def check(shape: str, device: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from random_model import write_random_model

    from emlens.bench.generate import bench_generate
    from emlens.bench.steer import bench_steer
    from emlens.capture.extract import extract_activations
    from emlens.capture.items import ExtractItem
    from emlens.generation.engine import GenerationConfig, Request, generate
    from emlens.generation.engines import ENGINES
    from emlens.model import load_model
    from emlens.steering.interventions import AddVector, steer

    start = time.time()
    folder = Path(tempfile.mkdtemp()) / shape
    write_random_model(shape, folder, "bfloat16" if device == "cuda" else "float32")
    model = load_model(str(folder), device=device)
    engines = ["hf"] + (["vllm"] if device == "cuda" and importlib.util.find_spec("vllm") else [])
    chats = [[{"role": "user", "content": f"Question {i}: what would you do as ruler of the world?"}] for i in range(16)]
    greedy = GenerationConfig(max_new_tokens=32, temperature=0.0, batch_size=16)
    layer = model.n_layers // 2
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    vector = vector / vector.norm() * float(model.d_model) ** 0.5  # about a residual's norm
    summary: dict[str, object] = {"shape": shape, "engines": "+".join(engines)}

    def tokens(engine, scale=None):
        steering = [] if scale is None else [AddVector(vector, layer, scale)]
        config = greedy.model_copy(update={"engine": engine})
        return [c.token_ids for c in generate(model, [Request(c, seed=i) for i, c in enumerate(chats)], config,
                                              steering, progress=False)]

    items = [ExtractItem(chat, response="Here is a short answer.") for chat in chats[:8]]
    site = f"blocks.{model.n_layers - 1}.hook_resid_post"  # downstream of the steered layer
    captured = {}
    for engine in engines:
        plain = tokens(engine)
        summary[f"{engine}_scale0_equals_plain"] = tokens(engine, 0.0) == plain
        summary[f"{engine}_large_scale_differs"] = tokens(engine, 8.0) != plain
        backend = "vllm" if engine == "vllm" else "torch-hooks"
        captured[engine] = extract_activations(model, items, [site], "last_prompt", backend=backend)[site]
        with steer(model, AddVector(vector, layer, 8.0)):
            steered = extract_activations(model, items, [site], "last_prompt", backend=backend)[site]
        summary[f"{engine}_capture_steered_differs"] = not torch.allclose(steered, captured[engine])
        sequences = [model.tokenizer(model.chat_text(c, add_generation_prompt=True), add_special_tokens=False)
                     ["input_ids"] for c in chats[:4]]
        top = ENGINES[engine].logprobs(model, sequences, 5)
        with steer(model, AddVector(vector, layer, 8.0)):
            top_steered = ENGINES[engine].logprobs(model, sequences, 5)
        summary[f"{engine}_logprobs_steered_differs"] = top != top_steered
        summary[f"{engine}_batch32_vs_batch1"] = bench_generate(model, [1, 32], 64, engine=engine, repeats=1,
                                                                echo=lambda _: None)["batch32_vs_batch1"
                                                                                    if engine == "hf" else "vllm_vs_hf"]
        summary[f"{engine}_steered_vs_plain"] = bench_steer(model, 32, 64, engine=engine, repeats=1,
                                                            echo=lambda _: None)["steered_vs_plain"]
    if "vllm" in engines:
        hf_tokens, vllm_tokens = tokens("hf"), tokens("vllm")
        summary["greedy_same_tokens"] = round(sum(a == b for a, b in zip(hf_tokens, vllm_tokens)) / len(chats), 3)
        relative = (captured["vllm"] - captured["hf"]).norm(dim=-1) / captured["hf"].norm(dim=-1)
        summary["capture_max_relative_diff"] = round(float(relative.max()), 5)
    summary["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    summary["seconds"] = round(time.time() - start)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
