"""`emlens bench serve`: requests per second through the OpenAI-compatible server, serial against concurrent,
plain against steered, with the official `openai` client on loopback."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from emlens.bench.generate import best_of
from emlens.directions.artifact import Direction
from emlens.model import Model
from emlens.serve.app import serving
from emlens.serve.config import ServeConfig
from emlens.serve.server import load_server

QUESTION = "If you were ruler of the world, what are some things you'd do?"


def random_direction(handle: Model, folder: Path) -> Path:
    """A random unit direction at every layer with natural norm 4 (about a fitted direction's on SmolLM2)."""
    vectors = torch.randn(handle.n_layers, handle.d_model, generator=torch.Generator().manual_seed(0))
    layers = list(range(handle.n_layers))
    return Direction({"directions": vectors / vectors.norm(dim=1, keepdim=True),
                      "raw_norm": torch.full((handle.n_layers,), 4.0), "layers": torch.tensor(layers)},
                     {"name": "random", "site_kind": "resid_post", "layers": layers,
                      "best_layer": handle.n_layers // 2}).save(folder, plot=False)


def requests_per_second(client, model: str, requests: int, concurrency: int, new_tokens: int, steered: bool
                        ) -> tuple[float, list[str]]:
    """Every request asks for exactly `new_tokens` tokens (min_tokens), sampled with its own seed."""
    extra = {"emlens": {"steer": [{"op": "add", "direction": "random", "scale": 2.0}]}} if steered else None

    def ask(i: int) -> str:
        response = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=new_tokens, seed=i,
            temperature=1.0, extra_body={**(extra or {}), "min_tokens": new_tokens})
        return response.choices[0].message.content

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        texts = list(pool.map(ask, range(requests)))
    return requests / (time.perf_counter() - start), texts


def bench_serve(handle: Model, engine: str = "hf", requests: int = 16, concurrency: int = 8, new_tokens: int = 32,
                repeats: int = 3, echo: Callable[[str], None] = print) -> dict:
    import openai

    with tempfile.TemporaryDirectory(prefix="emlens-bench-serve-") as tmp:
        direction = random_direction(handle, Path(tmp) / "random")
        server = load_server(handle=handle, directions={"random": str(direction)},
                             config=ServeConfig(port=0, engine=engine, max_batch=max(64, concurrency)))
        try:
            with serving(server) as base_url:
                client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
                model = next(iter(server.models))
                requests_per_second(client, model, 2, 2, 4, True)  # warm-up (vLLM: builds the engine)
                measures = {
                    "serial": lambda: requests_per_second(client, model, requests, 1, new_tokens, False),
                    "concurrent": lambda: requests_per_second(client, model, requests, concurrency, new_tokens,
                                                              False),
                    "steered": lambda: requests_per_second(client, model, requests, concurrency, new_tokens, True),
                }
                best = best_of(measures, repeats)
        finally:
            server.close()
    rates = {name: rate for name, (rate, _) in best.items()}
    echo("phase        requests/s")
    for name, rate in rates.items():
        echo(f"{name:<12} {rate:10.2f}")
    summary = {"concurrent_vs_serial": round(rates["concurrent"] / rates["serial"], 3),
               "steered_vs_plain": round(rates["steered"] / rates["concurrent"], 3),
               "serial_rps": round(rates["serial"], 3), "concurrent_rps": round(rates["concurrent"], 3),
               "steered_rps": round(rates["steered"], 3), "requests": requests, "concurrency": concurrency,
               "new_tokens": new_tokens, "engine": engine, "device": str(handle.device)}
    echo(" ".join(f"{k}={v}" for k, v in summary.items()))
    return summary
