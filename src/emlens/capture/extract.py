"""Read the residual stream: sites, token positions, three backends, and an activation store on disk.

Sites are named the TransformerLens way whatever backend runs them:

    blocks.{l}.hook_resid_pre   input of decoder layer l (layer 0: the token embeddings)
    blocks.{l}.hook_attn_out    output of layer l's attention block (after o_proj, before the residual add)
    blocks.{l}.hook_resid_mid   resid_pre + attn_out (the input of the MLP's norm)
    blocks.{l}.hook_mlp_out     output of layer l's MLP
    blocks.{l}.hook_resid_post  output of decoder layer l

The index convention, stated once and tested: `hook_resid_post` of layer l is the output of decoder layer l,
which equals HF `hidden_states[l + 1]` for every layer but the last (HF applies the final norm to
`hidden_states[-1]`; emlens never does). `hook_resid_pre` of layer l is `hidden_states[l]`.

Token positions: `last_prompt` (the last token of the chat-templated prompt, i.e. the one that predicts the
first response token), `mean_response` (mean over response tokens; prompt and padding masked out), `all`
(every non-pad token, prompt and response, row by row).

Backends: `torch-hooks` (default: forward hooks on the decoder layers, pooling inside the hook, no LM head, and
an early stop after the last site needed), `transformerlens` (TransformerBridge, on a copy of the model because
booting the bridge changes the model in place), `nnsight` (a trace of the decoder). All three agree.

The activation store is a folder: `shard-NNNNN.safetensors` (one tensor per site, shape (vectors, d_model)),
`index.parquet` (one row per input row, in input order: where its vectors are, plus the caller's columns) and
`cfg.json` (kind activation_store). Shards are flushed as they fill, so memory stays flat as the number of prompts grows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from emlens.base.errors import EmlensInputError
from emlens.capture.backends import DEFAULT_BACKEND, make_backend
from emlens.capture.items import (
    ExtractItem,
    TokenizedItem,
    _check_items,
    check_position,
    items_hash,
    iter_batches,
    tokenize_items,
    vector_counts,
)
from emlens.capture.store import ActivationStore, ActivationStoreWriter
from emlens.generation.engine import DEFAULT_BATCH_SIZE
from emlens.model import Model
from emlens.sites import Site, resolve_sites


def run_extraction(handle: Model, items: Sequence[ExtractItem], sites: list[Site], position: str = "last_prompt",
                   backend: str | object = DEFAULT_BACKEND, batch_size: int = DEFAULT_BATCH_SIZE,
                   max_response_tokens: int | None = None, progress: bool = True
                   ) -> Iterator[tuple[list[int], list[int], dict[str, Tensor]]]:
    """Yield (rows, counts, {site: vectors}) batch by batch; vectors of a row are `counts[i]` consecutive rows."""
    check_position(position)
    tokenized = tokenize_items(handle, items, max_response_tokens)
    _check_items(items, tokenized, position)
    yield from run_tokenized(handle, tokenized, sites, position, backend, batch_size, progress)


def run_tokenized(handle: Model, tokenized: Sequence[TokenizedItem], sites: list[Site], position: str,
                  backend: str | object = DEFAULT_BACKEND, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True
                  ) -> Iterator[tuple[list[int], list[int], dict[str, Tensor]]]:
    runner = make_backend(handle, backend) if isinstance(backend, str) else backend
    counts = vector_counts(tokenized, position)
    bar = tqdm(total=len(tokenized), desc=f"extract ({runner.name})", unit="row", disable=not progress)
    batch_size = max(batch_size, getattr(runner, "batch_size", 0))  # vLLM schedules large batches itself
    with torch.inference_mode():
        for batch in iter_batches(handle, tokenized, batch_size):
            found = runner.run(batch, sites, position)
            yield batch.rows, [counts[r] for r in batch.rows], {k: v.to("cpu") for k, v in found.items()}
            bar.update(len(batch.rows))
    bar.close()


def extract_activations(handle: Model, items: Sequence[ExtractItem], sites: list[Site] | Sequence[str],
                        position: str = "last_prompt", backend: str = DEFAULT_BACKEND, batch_size: int = DEFAULT_BATCH_SIZE,
                        max_response_tokens: int | None = None, progress: bool = False) -> dict[str, Tensor]:
    """In memory, in input order: {site name: (vectors, d_model)}. For small inputs; use `extract_to_store` else."""
    sites = _as_sites(handle, sites)
    parts: dict[str, list[tuple[int, Tensor]]] = {s.name: [] for s in sites}
    for rows, counts, found in run_extraction(handle, items, sites, position, backend, batch_size,
                                              max_response_tokens, progress):
        for name, vectors in found.items():
            for row, chunk in zip(rows, vectors.split(counts), strict=False):
                parts[name].append((row, chunk))
    return {name: torch.cat([c for _, c in sorted(chunks, key=lambda x: x[0])]) for name, chunks in parts.items()}


class Activations(dict):
    """{site name: (vectors, d_model) tensor}, with where they came from (for the provenance of what is fitted)."""

    def __init__(self, vectors: dict[str, Tensor], model: dict, position: str):
        super().__init__(vectors)
        self.model, self.position = model, position

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}: {tuple(v.shape)}" for name, v in self.items())
        return f"Activations({self.position}; {shapes})"


def as_items(prompts: str | Sequence) -> list[ExtractItem]:
    """Prompts as extraction items: a string, a chat (list of {role, content}), an ExtractItem, or a list of these."""
    if isinstance(prompts, (str, ExtractItem)) or (prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]
    items = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, ExtractItem):
            items.append(prompt)
        elif isinstance(prompt, str):
            items.append(ExtractItem([{"role": "user", "content": prompt}]))
        elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            items.append(ExtractItem(prompt))
        else:
            raise EmlensInputError(f"prompts item {i}: expected a string, a chat (list of {{role, content}}) or an "
                                   f"ExtractItem, got {type(prompt).__name__}")
    return items


def activations(model: Model, prompts: str | Sequence, sites: str | Sequence[str] = "resid_post",
                position: str = "last_prompt", layers: str | Sequence[int] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                backend: str = DEFAULT_BACKEND, max_response_tokens: int | None = None,
                progress: bool = False) -> Activations:
    """Read the residual stream of prompts, in memory: `{site name: (vectors, d_model)}` in input order.

    `sites`: a site kind (`resid_post`, every layer or `layers`), a pattern `blocks.*.hook_mlp_out`, or full
    names. `position`: `last_prompt`, `mean_response` (items with responses) or `all` (every real token).
    Inside `with em.steer(model, ...)` the activations are read under the steering.
    """
    items = as_items(prompts)
    chosen = resolve_sites(sites, model.n_layers, layers)
    vectors = extract_activations(model, items, chosen, position, backend, batch_size, max_response_tokens, progress)
    return Activations(vectors, model.describe(), position)


def _as_sites(handle: Model, sites) -> list[Site]:
    if sites and all(isinstance(s, Site) for s in sites):
        return sorted(sites)
    return resolve_sites(sites, handle.n_layers)


def extract_to_store(handle: Model, items: Sequence[ExtractItem], out: str | Path, sites: list[Site] | Sequence[str],
                     position: str = "last_prompt", backend: str = DEFAULT_BACKEND, batch_size: int = DEFAULT_BATCH_SIZE,
                     max_response_tokens: int | None = None, dtype: str = "float32", shard_mb: float = 32.0,
                     manifest: dict | None = None, progress: bool = True) -> ActivationStore:
    """Stream activations of `items` into an activation store at `out` (replaced atomically when complete)."""
    sites = _as_sites(handle, sites)
    check_position(position)
    full_manifest = {"model": handle.describe(), "position": position, "backend": backend,
                     "max_response_tokens": max_response_tokens, "data_hash": items_hash(items), **(manifest or {})}
    metas = [{**item.meta, "row": i} for i, item in enumerate(items)]
    with ActivationStoreWriter(out, [s.name for s in sites], handle.d_model, full_manifest, dtype,
                               shard_mb) as writer:
        for rows, counts, found in run_extraction(handle, items, sites, position, backend, batch_size,
                                                  max_response_tokens, progress):
            vectors = {name: v for name, v in found.items()}
            writer.add([metas[r] for r in rows], counts, vectors)
        return writer.close()
