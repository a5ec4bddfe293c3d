"""`emlens bench extract`: extraction speed against a bare forward, per backend, and store memory against N.

The limit is a no-grad forward of the same batches through the decoder layers without the LM head
(`model.model(...)`): extraction needs no logits. Each backend reads `hook_resid_post` of every layer at the
last token and streams it into an activation store (written to a temporary folder), so the time includes
pooling, the copy to CPU and the store writes; the methods run interleaved batch by batch, so load from other
processes slows them alike. Peak memory is measured in a fresh process per size (peak RSS
minus RSS after loading the model) at 1x, 4x and 16x the prompts.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from emlens.bench.generate import bench_prompts
from emlens.capture.backends import BACKENDS, make_backend
from emlens.capture.extract import run_tokenized
from emlens.capture.items import TokenizedItem, iter_batches
from emlens.capture.store import ActivationStoreWriter
from emlens.model import Model, load_model
from emlens.sites import resolve_sites


def bench_tokens(handle: Model, prompts: int, tokens: int) -> list[TokenizedItem]:
    """`prompts` distinct windows of exactly `tokens` tokens over the Betley questions (no padding needed)."""

    text = " ".join(m[0]["content"] for m in bench_prompts(24))
    ids = handle.tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < tokens + 7 * prompts:
        ids = ids + ids
    return [TokenizedItem(ids=ids[7 * i:7 * i + tokens], prompt_len=tokens) for i in range(prompts)]


def forward_batch(handle: Model, batch) -> None:
    handle.base_model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, use_cache=False)


def open_writer(handle: Model, folder: Path, sites, shard_mb: float) -> ActivationStoreWriter:
    return ActivationStoreWriter(folder, [s.name for s in sites], handle.d_model, {"position": "last_prompt"},
                                 shard_mb=shard_mb)


def timed_pass(handle: Model, tokenized: list[TokenizedItem], runners: dict, batch_size: int, shard_mb: float,
               folder: Path, rotate: int = 0) -> dict[str, list[float]]:
    """One pass over the prompts for the bare forward and every backend, interleaved batch by batch.

    Each backend's time covers its forward with hooks, pooling, the copy to CPU and its store writes (the
    store is closed and timed at the end), so a busy machine slows every method alike. Returns each method's
    time per batch (the store's closing time added to its last batch).
    """
    sites = resolve_sites("resid_post", handle.n_layers)
    names = ["forward", *runners]
    times: dict[str, list[float]] = {name: [] for name in names}
    writers = {name: open_writer(handle, folder / name, sites, shard_mb) for name in runners}
    with torch.inference_mode():
        for i, batch in enumerate(iter_batches(handle, tokenized, batch_size)):
            k = (i + rotate) % len(names)
            for name in names[k:] + names[:k]:  # rotate who goes first: no method always runs on a cold cache
                start = time.perf_counter()
                if name == "forward":
                    forward_batch(handle, batch)
                else:
                    found = runners[name].run(batch, sites, "last_prompt")
                    writers[name].add([{"row": r} for r in batch.rows], [1] * len(batch.rows),
                                      {key: v.to("cpu") for key, v in found.items()})
                times[name].append(time.perf_counter() - start)
    for name, writer in writers.items():
        start = time.perf_counter()
        writer.close()
        times[name][-1] += time.perf_counter() - start
    return times


def store_extraction(handle: Model, tokenized: list[TokenizedItem], runner, batch_size: int, shard_mb: float,
                     folder: Path) -> int:
    """Every layer's resid_post at the last token into a store at `folder`; returns the vectors written."""
    sites = resolve_sites("resid_post", handle.n_layers)
    with open_writer(handle, folder, sites, shard_mb) as writer:
        for rows, counts, found in run_tokenized(handle, tokenized, sites, "last_prompt", runner, batch_size,
                                                 progress=False):
            writer.add([{"row": r} for r in rows], counts, found)
        store = writer.close()
    return store.manifest["n_vectors"]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0), so VmHWM is the peak since now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        return _status_mb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_child(model: str, adapter: str | None, device: str, prompts: int, tokens: int, batch_size: int,
                 shard_mb: float, backend: str) -> None:
    """Run in a fresh process: load, extract `prompts` rows into a store, print peak RSS growth as JSON."""

    handle = load_model(model, adapter=adapter, device=device)
    tokenized = bench_tokens(handle, prompts, tokens)
    runner = make_backend(handle, backend)
    with tempfile.TemporaryDirectory(prefix="emlens-bench-") as tmp:  # warm-up: touch the (mmapped) weights
        store_extraction(handle, tokenized[:batch_size], runner, batch_size, shard_mb, Path(tmp) / "store")
    import gc

    gc.collect()
    before = _status_mb("VmRSS")
    reset_peak_rss()
    with tempfile.TemporaryDirectory(prefix="emlens-bench-") as tmp:
        n = store_extraction(handle, tokenized, runner, batch_size, shard_mb, Path(tmp) / "store")
        store_mb = sum(f.stat().st_size for f in (Path(tmp) / "store").iterdir()) / 2**20
    peak = peak_rss_mb()
    print(json.dumps({"prompts": prompts, "vectors": n, "peak_delta_mb": peak - before, "store_mb": store_mb}))


def measure_memory(handle: Model, prompts: int, tokens: int, batch_size: int, shard_mb: float, backend: str) -> dict:
    args = [handle.spec, handle.adapter, str(handle.device), prompts, tokens, batch_size, shard_mb, backend]
    code = f"from emlens.bench.extract import memory_child; memory_child(*{args!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory run failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_extract(handle: Model, prompts: int = 64, tokens: int = 128, batch_size: int = 16, repeats: int = 3,
                  backends: list[str] | None = None, memory_multiples: tuple[int, ...] = (1, 4, 16),
                  memory_tokens: int = 16, shard_mb: float = 32.0,
                  echo: Callable[[str], None] = print) -> dict:
    backends = backends or list(BACKENDS)
    tokenized = bench_tokens(handle, prompts, tokens)
    runners = {name: make_backend(handle, name) for name in backends}
    passes: list[dict[str, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="emlens-bench-") as tmp:
        timed_pass(handle, tokenized[:batch_size], runners, batch_size, shard_mb, Path(tmp) / "warm")
        for repeat in range(repeats):
            passes.append(timed_pass(handle, tokenized, runners, batch_size, shard_mb, Path(tmp) / f"r{repeat}",
                                     rotate=repeat))
    # Per method: the median total over passes, and the sum over batches of each batch's fastest pass (the
    # estimate least disturbed by other processes; the ratio uses it).
    medians = {name: statistics.median(sum(p[name]) for p in passes) for name in passes[0]}
    bests = {name: sum(min(p[name][b] for p in passes) for b in range(len(passes[0][name]))) for name in passes[0]}
    n_tokens = prompts * tokens
    echo(f"{prompts} prompts x {tokens} tokens, all {handle.n_layers} layers' hook_resid_post, last token, "
         f"batch {batch_size}, {repeats} passes interleaved batch by batch (store writes included); "
         f"best = sum over batches of the fastest pass")
    echo(f"{'method':<16} {'median s':>9} {'best s':>8} {'tok/s':>8} {'vs forward':>10}")
    for name in medians:
        echo(f"{name:<16} {medians[name]:>9.2f} {bests[name]:>8.2f} {n_tokens / bests[name]:>8.0f} "
             f"{bests[name] / bests['forward']:>10.3f}")
    summary: dict[str, float] = {"forward_s": round(bests["forward"], 2)}
    for name in runners:
        key = name.replace("-", "_")
        summary[f"{key}_s"] = round(bests[name], 2)
        summary[f"{key}_vs_forward"] = round(bests[name] / bests["forward"], 3)
        summary[f"{key}_vs_forward_median"] = round(medians[name] / medians["forward"], 3)
    summary["default_vs_forward"] = summary["torch_hooks_vs_forward"] if "torch-hooks" in runners else float("nan")

    echo(f"memory: fresh process per size, {memory_tokens} tokens per prompt, shard_mb {shard_mb:g}, torch-hooks")
    echo(f"{'prompts':>8} {'vectors':>8} {'store MB':>9} {'peak RSS growth MB':>19}")
    peaks = {}
    for multiple in memory_multiples:
        result = measure_memory(handle, prompts * multiple, memory_tokens, batch_size, shard_mb, "torch-hooks")
        peaks[multiple] = result["peak_delta_mb"]
        echo(f"{result['prompts']:>8} {result['vectors']:>8} {result['store_mb']:>9.1f} {result['peak_delta_mb']:>19.1f}")
        summary[f"peak_mb_{multiple}x"] = round(result["peak_delta_mb"], 1)
    lo, hi = min(memory_multiples), max(memory_multiples)
    summary[f"memory_{hi}x_vs_{lo}x"] = round(peaks[hi] / max(peaks[lo], 1.0), 2)  # floor: 1 MB
    echo(" ".join(f"{k}={v}" for k, v in summary.items()))
    return summary
