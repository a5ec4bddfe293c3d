"""`emlens bench generate` and `emlens bench load`: engine tokens/s by batch size, and model load time."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from emlens.data.questions import read_questions
from emlens.generation.engine import GenerationConfig, Request, generate
from emlens.model import Model, load_model


def bench_prompts(n: int) -> list[list[dict]]:
    """n chats cycling over the Betley first-plot questions."""
    texts = [q.paraphrases[0] for q in read_questions("betley-first-plot")]
    return [[{"role": "user", "content": texts[i % len(texts)]}] for i in range(n)]


def tokens_per_second(handle: Model, batch: int, new_tokens: int, temperature: float) -> float:
    # Every row generates exactly new_tokens (EOS suppressed), so batches of all sizes do the same work per row.
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=temperature,
                              top_p=0.9 if temperature else 1.0, batch_size=batch)
    requests = [Request(messages=m, seed=i) for i, m in enumerate(bench_prompts(batch))]
    start = time.perf_counter()
    completions = generate(handle, requests, config, progress=False)
    elapsed = time.perf_counter() - start
    return sum(len(c.token_ids) for c in completions) / elapsed


def hf_tokens_per_second(handle: Model, batch: int, new_tokens: int, temperature: float) -> float:
    tok = handle.tokenizer
    texts = [handle.chat_text(m) for m in bench_prompts(batch)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(handle.device)
    kwargs = dict(do_sample=True, temperature=temperature, top_p=0.9) if temperature else dict(do_sample=False)
    start = time.perf_counter()
    with torch.inference_mode():
        handle.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=tok.pad_token_id, **kwargs)
    return batch * new_tokens / (time.perf_counter() - start)


def bench_generate(handle: Model, batches: list[int], new_tokens: int, hf_baseline: bool = False,
                   echo: Callable[[str], None] = print) -> dict:
    tokens_per_second(handle, 2, 4, 0.0)  # warm-up
    results: dict[str, float] = {}
    engines = [("emlens", tokens_per_second)] + ([("hf", hf_tokens_per_second)] if hf_baseline else [])
    echo(f"{'engine':<8} {'mode':<8} {'batch':>5} {'tok/s':>8}")
    for engine, measure in engines:
        for mode, temperature in (("greedy", 0.0), ("sampled", 0.7)):
            for batch in batches:
                rate = measure(handle, batch, new_tokens, temperature)
                results[f"{engine}_{mode}_b{batch}"] = rate
                echo(f"{engine:<8} {mode:<8} {batch:>5} {rate:>8.1f}")
    summary = {f"{k}_tok_s": round(v, 1) for k, v in results.items()}
    lo, hi = min(batches), max(batches)
    for engine, _ in engines:
        prefix = "" if engine == "emlens" else "hf_"
        summary[f"{prefix}batch{hi}_vs_batch{lo}"] = round(results[f"{engine}_greedy_b{hi}"] / results[f"{engine}_greedy_b{lo}"], 2)
        summary[f"{prefix}sampled_batch{hi}_vs_batch{lo}"] = round(
            results[f"{engine}_sampled_b{hi}"] / results[f"{engine}_sampled_b{lo}"], 2)
    echo(" ".join(f"{k}={v}" for k, v in summary.items()))
    return summary


def bench_load(spec: str, repeats: int = 3, echo: Callable[[str], None] = print) -> dict:
    """Seconds for `load_model(spec)` once the conversion cache exists (best of `repeats`)."""

    load_model(spec, device="cpu")  # converts on first use; not timed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        load_model(spec, device="cpu")
        times.append(time.perf_counter() - start)
    summary = {"model": spec, "load_s": round(min(times), 2), "load_s_median": round(sorted(times)[len(times) // 2], 2)}
    echo(" ".join(f"{k}={v}" for k, v in summary.items()))
    return summary
