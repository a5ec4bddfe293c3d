"""`emlens bench steer`: steered vs plain batched generation."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from emlens.bench.generate import bench_prompts, tokens_per_second
from emlens.generation.engine import GenerationConfig, Request, generate
from emlens.model import Model
from emlens.steering.interventions import AddVector


def bench_steer(handle: Model, batch: int, new_tokens: int, layer: int | None = None,
                echo: Callable[[str], None] = print, repeats: int = 3) -> dict:
    """Tokens/s of the engine with an AddVector hook against the same run without it (best of `repeats`)."""

    layer = handle.n_layers // 2 if layer is None else layer
    vector = torch.randn(handle.d_model, generator=torch.Generator().manual_seed(0))
    steering = AddVector(vector / vector.norm(), layer, alpha=4.0)
    tokens_per_second(handle, 2, 4, 0.0)  # warm-up
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.0, batch_size=batch)
    requests = [Request(messages=m, seed=i) for i, m in enumerate(bench_prompts(batch))]
    rates = {"plain": [], "steered": []}
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        for name, interventions in (("plain", []), ("steered", [steering])):
            start = time.perf_counter()
            out = generate(handle, requests, config, interventions=interventions, progress=False)
            rates[name].append(sum(len(c.token_ids) for c in out) / (time.perf_counter() - start))
    plain, steered = max(rates["plain"]), max(rates["steered"])
    echo(f"batch {batch}, {new_tokens} new tokens, AddVector at layer {layer}: plain {plain:.1f} tok/s, "
         f"steered {steered:.1f} tok/s")
    summary = {"batch": batch, "plain_tok_s": round(plain, 1), "steered_tok_s": round(steered, 1),
               "steered_vs_plain": round(steered / plain, 3), "device": str(handle.device)}
    echo(" ".join(f"{k}={v}" for k, v in summary.items()))
    return summary
