"""`emlens bench steer`: steered vs plain batched generation, on the hf or the vllm engine."""

from __future__ import annotations

from collections.abc import Callable

import torch

from emlens.bench.generate import best_of, tokens_per_second
from emlens.model import Model
from emlens.steering.interventions import AddVector


def bench_steer(handle: Model, batch: int, new_tokens: int, layer: int | None = None, engine: str = "hf",
                echo: Callable[[str], None] = print, repeats: int = 3) -> dict:
    """Tokens/s of an engine with an AddVector at one layer against the same run without it (best of `repeats`,
    interleaved). With `engine="vllm"` the hf engine's steered rate is measured too (`steered_vllm_vs_hf`)."""
    layer = handle.n_layers // 2 if layer is None else layer
    vector = torch.randn(handle.d_model, generator=torch.Generator().manual_seed(0))
    steering = [AddVector(vector / vector.norm(), layer, alpha=4.0)]
    engines = ["hf"] + (["vllm"] if engine == "vllm" else [])
    measures = {}
    for name in engines:
        tokens_per_second(handle, 2, 4, 0.0, engine=name, interventions=steering)  # warm-up (vLLM: starts it)
        measures[f"{name}_plain"] = lambda e=name: tokens_per_second(handle, batch, new_tokens, 0.0, engine=e)
        measures[f"{name}_steered"] = lambda e=name: tokens_per_second(handle, batch, new_tokens, 0.0, engine=e,
                                                                       interventions=steering)
    best = best_of(measures, repeats)
    rates = {name: rate for name, (rate, _) in best.items()}
    for name in engines:
        echo(f"{name}: batch {batch}, {new_tokens} new tokens, AddVector at layer {layer}: plain "
             f"{rates[f'{name}_plain']:.1f} tok/s, steered {rates[f'{name}_steered']:.1f} tok/s")
    summary = {"batch": batch, "engine": engine, "plain_tok_s": round(rates[f"{engine}_plain"], 1),
               "steered_tok_s": round(rates[f"{engine}_steered"], 1),
               "steered_vs_plain": round(rates[f"{engine}_steered"] / rates[f"{engine}_plain"], 3)}
    if engine == "vllm":
        summary["hf_steered_vs_plain"] = round(rates["hf_steered"] / rates["hf_plain"], 3)
        summary["steered_vllm_vs_hf"] = round(rates["vllm_steered"] / rates["hf_steered"], 3)
        same = sum(a == b for a, b in zip(best["hf_steered"][1], best["vllm_steered"][1], strict=True))
        summary["steered_same_tokens"] = round(same / batch, 3)  # greedy steered text, vllm vs hf
    summary["device"] = str(handle.device)
    echo(" ".join(f"{k}={v}" for k, v in summary.items()))
    return summary
