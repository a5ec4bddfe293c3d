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
`manifest.json`. Shards are flushed as they fill, so memory stays flat as the number of prompts grows.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .errors import EmlensInputError

SITE_KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")  # in execution order within a layer
POSITIONS = ("last_prompt", "mean_response", "all")
BACKENDS = ("torch-hooks", "transformerlens", "nnsight")
DEFAULT_BACKEND = "torch-hooks"
STORE_FORMAT = 1
_SITE_RE = re.compile(r"^blocks\.(\d+|\*)\.hook_([a-z_]+)$")


# ---------------------------------------------------------------- sites


def site_name(layer: int, kind: str = "resid_post") -> str:
    """The TransformerLens name of a site: `site_name(15) == "blocks.15.hook_resid_post"`."""
    if kind not in SITE_KINDS:
        raise EmlensInputError(f"site kind '{kind}': unknown (known: {', '.join(SITE_KINDS)})")
    return f"blocks.{layer}.hook_{kind}"


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    order: int  # position of the kind within a layer's forward pass, so sorted sites are in execution order

    @property
    def kind(self) -> str:
        return SITE_KINDS[self.order]

    @property
    def name(self) -> str:
        return site_name(self.layer, self.kind)

    @classmethod
    def of(cls, layer: int, kind: str) -> "Site":
        site_name(layer, kind)  # validates the kind
        return cls(layer, SITE_KINDS.index(kind))


def parse_layers(text: str | int | Sequence[int] | None, n_layers: int) -> list[int]:
    """`all`, `15`, `-1`, `0-5,10,20-29` or a list of ints -> sorted layer indices, checked against the model."""
    if text is None or (isinstance(text, str) and text.strip() == "all"):
        return list(range(n_layers))
    parts: list = [text] if isinstance(text, int) else (list(text) if not isinstance(text, str) else
                                                         [p.strip() for p in text.split(",") if p.strip()])
    layers: set[int] = set()
    for part in parts:
        try:
            if isinstance(part, str) and re.fullmatch(r"\d+-\d+", part):
                lo, hi = (int(x) for x in part.split("-"))
                chosen = range(lo, hi + 1)
            else:
                chosen = [int(part)]
        except (TypeError, ValueError):
            raise EmlensInputError(f"layers '{text}': '{part}' is not a layer number or range like 3-7") from None
        for layer in chosen:
            resolved = layer + n_layers if layer < 0 else layer
            if not 0 <= resolved < n_layers:
                raise EmlensInputError(f"layers '{text}': layer {layer} out of range (the model has {n_layers}: "
                                       f"0-{n_layers - 1})")
            layers.add(resolved)
    if not layers:
        raise EmlensInputError(f"layers '{text}': no layer selected")
    return sorted(layers)


def parse_site(name: str, n_layers: int) -> Site:
    """One full TransformerLens site name -> Site; unknown layers or kinds are a one-line error."""
    match = _SITE_RE.match(name.strip())
    if not match or match.group(1) == "*":
        raise EmlensInputError(f"site '{name}': expected blocks.<layer>.hook_<kind> with kind one of "
                               f"{', '.join(SITE_KINDS)}")
    kind = match.group(2)
    if kind not in SITE_KINDS:
        raise EmlensInputError(f"site '{name}': unknown kind 'hook_{kind}' (known: "
                               f"{', '.join('hook_' + k for k in SITE_KINDS)})")
    layer = int(match.group(1))
    if layer >= n_layers:
        raise EmlensInputError(f"site '{name}': layer {layer} out of range (the model has {n_layers} layers: "
                               f"0-{n_layers - 1})")
    return Site.of(layer, kind)


def resolve_sites(sites: str | Iterable[str], n_layers: int, layers: str | Sequence[int] | None = None) -> list[Site]:
    """Sites from full names (`blocks.3.hook_resid_post`), patterns (`blocks.*.hook_mlp_out`) or kinds
    (`resid_post`); patterns and kinds expand over `layers` (default: all). Sorted in execution order."""
    entries = [sites] if isinstance(sites, str) else list(sites)
    if not entries:
        raise EmlensInputError("sites: none given")
    chosen: set[Site] = set()
    for entry in entries:
        entry = entry.strip()
        if entry in SITE_KINDS or entry.removeprefix("hook_") in SITE_KINDS:
            kind = entry.removeprefix("hook_")
            chosen.update(Site.of(layer, kind) for layer in parse_layers(layers, n_layers))
        elif entry.startswith("blocks.*."):
            kind = entry.removeprefix("blocks.*.hook_")
            if kind not in SITE_KINDS:
                raise EmlensInputError(f"site '{entry}': unknown kind (known: {', '.join(SITE_KINDS)})")
            chosen.update(Site.of(layer, kind) for layer in parse_layers(layers, n_layers))
        else:
            chosen.add(parse_site(entry, n_layers))
    return sorted(chosen)


def check_position(position: str) -> str:
    if position not in POSITIONS:
        raise EmlensInputError(f"position '{position}': unknown (known: {', '.join(POSITIONS)})")
    return position


# ---------------------------------------------------------------- inputs


@dataclass
class ExtractItem:
    """One row to read: a chat (list of {role, content}) and optionally the response that followed it.

    `meta` holds scalar columns copied into the store index (ids, labels, groups).
    """

    messages: list[dict]
    response: str | None = None
    meta: dict = field(default_factory=dict)


def items_hash(items: Sequence[ExtractItem]) -> str:
    """A hash of what the model reads (chats and responses), for provenance and store reuse."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.messages, item.response], ensure_ascii=False, sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def items_from_table(frame: pd.DataFrame, with_response: bool = True, keep: Sequence[str] = ()) -> list[ExtractItem]:
    """Rows of an eval table (`messages` JSON + `response`) or of any table with a question/prompt column."""
    prompt_column = next((c for c in ("messages", "paraphrase", "question", "prompt") if c in frame.columns), None)
    if prompt_column is None:
        raise EmlensInputError(f"table: no prompt column (expected messages, paraphrase, question or prompt; "
                               f"found {', '.join(map(str, frame.columns[:12]))})")
    response_column = next((c for c in ("response", "answer") if c in frame.columns), None) if with_response else None
    items = []
    for i, row in enumerate(frame.to_dict("records")):
        raw = row[prompt_column]
        if prompt_column == "messages":
            messages = json.loads(raw) if isinstance(raw, str) else list(raw)
        else:
            messages = [{"role": "user", "content": str(raw)}]
        value = None if response_column is None else row[response_column]
        response = None if value is None else ("" if pd.isna(value) else str(value))
        meta = {"table_row": i, **{k: row[k] for k in keep if k in row}}
        items.append(ExtractItem(messages=messages, response=response, meta=meta))
    return items


TEXT_COLUMNS = ("messages", "response", "answer", "paraphrase", "question", "nudge_text", "prompt")


def items_from_run_table(frame: pd.DataFrame, with_response: bool = True) -> list[ExtractItem]:
    """An eval table's rows, keeping its scalar columns (ids, nudge, labels, scores) for the store index."""
    keep = [c for c in frame.columns if c not in TEXT_COLUMNS]
    return items_from_table(frame, with_response=with_response, keep=keep)


def items_from_questions(source: str, nudges: Sequence = (), system: str | None = None,
                         limit: int | None = None) -> list[ExtractItem]:
    """A question file (any `load_questions` format) or bundled set: every question x nudge, first paraphrase."""
    from .data import Message, apply_nudge, question_messages
    from .sampling import read_questions

    items = []
    for q in read_questions(source, limit=limit):
        messages = question_messages(q, 0)
        if system is not None:
            messages = [Message(role="system", content=system), *[m for m in messages if m.role != "system"]]
        for nudge in nudges or [None]:
            chat = apply_nudge(messages, nudge) if nudge is not None else messages
            items.append(ExtractItem(messages=[m.model_dump() for m in chat],
                                     meta={"question_id": q.id, "nudge": nudge.name if nudge else "none"}))
    return items


@dataclass
class TokenizedItem:
    ids: list[int]
    prompt_len: int


def tokenize_items(handle, items: Sequence[ExtractItem], max_response_tokens: int | None = None) -> list[TokenizedItem]:
    """Chat-template each prompt (with the generation prompt) and append the response tokens, as generation does."""
    tok = handle.tokenizer
    out = []
    for item in items:
        prompt = tok(handle.chat_text(item.messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        response = tok(item.response, add_special_tokens=False)["input_ids"] if item.response else []
        if max_response_tokens is not None:
            response = response[:max_response_tokens]
        out.append(TokenizedItem(ids=list(prompt) + list(response), prompt_len=len(prompt)))
    return out


@dataclass
class Batch:
    """A left-padded batch with the masks every position policy needs."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    position_ids: Int[Tensor, "batch pos"]
    last_prompt: Int[Tensor, " batch"]  # column of each row's last prompt token
    response_mask: Bool[Tensor, "batch pos"]
    rows: list[int]  # indices into the input items

    @property
    def token_mask(self) -> Bool[Tensor, "batch pos"]:
        return self.attention_mask.bool()


def make_batch(tokenized: Sequence[TokenizedItem], rows: list[int], pad_id: int, device) -> Batch:
    width = max(len(tokenized[r].ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    response = torch.zeros((len(rows), width), dtype=torch.bool)
    last = torch.zeros(len(rows), dtype=torch.long)
    for b, r in enumerate(rows):
        item = tokenized[r]
        start = width - len(item.ids)
        ids[b, start:] = torch.tensor(item.ids, dtype=torch.long)
        mask[b, start:] = 1
        response[b, start + item.prompt_len:] = True
        last[b] = start + item.prompt_len - 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
    return Batch(ids.to(device), mask.to(device), positions.to(device), last.to(device), response.to(device), rows)


def pool(hidden: Float[Tensor, "batch pos d_model"], batch: Batch, position: str) -> Float[Tensor, "vec d_model"]:
    """Reduce a site's (batch, pos, d_model) activations to the vectors the position policy keeps."""
    if position == "last_prompt":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.last_prompt].float()
    if position == "mean_response":
        weights = batch.response_mask.to(torch.float32)
        weights = weights / weights.sum(-1, keepdim=True)
        return torch.einsum("bp,bpd->bd", weights, hidden.float())
    return hidden[batch.token_mask].float()  # "all": row-major, each row's real tokens in order


def vector_counts(tokenized: Sequence[TokenizedItem], position: str) -> list[int]:
    if position == "all":
        return [len(t.ids) for t in tokenized]
    return [1] * len(tokenized)


# ---------------------------------------------------------------- backends


class _StopForward(Exception):
    """Raised by the last hook needed: the layers after it (and the final norm) never run."""


def _tensor_of(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _mid_norm(layer_module):
    # The module whose input is resid_mid: Gemma-2 style layers norm the attention output first
    # (post_attention_layernorm) and feed resid_mid to pre_feedforward_layernorm.
    return getattr(layer_module, "pre_feedforward_layernorm", None) or layer_module.post_attention_layernorm


class TorchHooksBackend:
    """Forward hooks on the HF decoder layers; pools inside the hook and stops after the last site needed."""

    name = "torch-hooks"

    def __init__(self, handle):
        self.handle = handle

    def _register(self, site: Site, sink: Callable[[Tensor], None]):
        layer = self.handle.decoder_layers[site.layer]
        if site.kind == "resid_pre":
            return layer.register_forward_pre_hook(
                lambda m, args, kwargs: sink(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        if site.kind == "resid_mid":
            return _mid_norm(layer).register_forward_pre_hook(lambda m, args: sink(args[0]))
        module = {"resid_post": layer, "attn_out": layer.self_attn, "mlp_out": layer.mlp}[site.kind]
        return module.register_forward_hook(lambda m, args, output: sink(_tensor_of(output)))

    def run(self, batch: Batch, sites: list[Site], position: str) -> dict[str, Tensor]:
        found: dict[str, Tensor] = {}
        last = max(sites)

        def sink_for(site: Site):
            def sink(hidden: Tensor) -> None:
                found[site.name] = pool(hidden, batch, position)
                if site == last:
                    raise _StopForward
            return sink

        handles = [self._register(site, sink_for(site)) for site in sites]
        try:
            self.handle.base_model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                         position_ids=batch.position_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return found


class NNsightBackend:
    """An nnsight trace of the decoder (no LM head); sites are read in execution order, pooled in the trace."""

    name = "nnsight"

    def __init__(self, handle):
        import nnsight

        self.nnsight = nnsight
        self.model = nnsight.NNsight(handle.base_model.model)

    def _envoy_value(self, site: Site):
        layer = self.model.layers[site.layer]
        if site.kind == "resid_pre":
            return layer.input
        if site.kind == "resid_mid":
            norm = layer.pre_feedforward_layernorm if hasattr(layer, "pre_feedforward_layernorm") else \
                layer.post_attention_layernorm
            return norm.input
        if site.kind == "attn_out":
            return layer.self_attn.output[0]
        if site.kind == "mlp_out":
            return layer.mlp.output
        return layer.output

    def run(self, batch: Batch, sites: list[Site], position: str) -> dict[str, Tensor]:
        with self.model.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, use_cache=False) as tracer:
            pooled = self.nnsight.save([pool(_tensor_of(self._envoy_value(s)), batch, position) for s in sites])
            tracer.stop()
        return {s.name: v for s, v in zip(sites, pooled)}


class TransformerLensBackend:
    """TransformerBridge hooks on a COPY of the model (booting the bridge rewires the model it wraps)."""

    name = "transformerlens"

    def __init__(self, handle):
        from transformer_lens.model_bridge import TransformerBridge

        model = copy.deepcopy(handle.model)
        # The bridge cannot wrap a PeftModel; the LoRA layers live on inside the base model.
        hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            self.bridge = TransformerBridge.boot_transformers(
                handle.spec, device=str(handle.device), dtype=handle.dtype, tokenizer=handle.tokenizer,
                hf_model=hf_model)

    def run(self, batch: Batch, sites: list[Site], position: str) -> dict[str, Tensor]:
        found: dict[str, Tensor] = {}

        def hook_for(site: Site):
            def hook(value, hook):
                found[site.name] = pool(value, batch, position)
                return value
            return hook

        stop = max(s.layer for s in sites) + 1
        with self.bridge.hooks(fwd_hooks=[(s.name, hook_for(s)) for s in sites]):
            self.bridge(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                        return_type=None, stop_at_layer=stop if stop < len(self.bridge.blocks) else None)
        return found


def make_backend(handle, backend: str = DEFAULT_BACKEND):
    classes = {"torch-hooks": TorchHooksBackend, "transformerlens": TransformerLensBackend, "nnsight": NNsightBackend}
    if backend not in classes:
        raise EmlensInputError(f"backend '{backend}': unknown (known: {', '.join(BACKENDS)})")
    return classes[backend](handle)


# ---------------------------------------------------------------- the extraction loop


def _check_items(items: Sequence[ExtractItem], tokenized: Sequence[TokenizedItem], position: str) -> None:
    if not items:
        raise EmlensInputError("extract: no rows to read")
    if position == "mean_response":
        for i, (item, tok) in enumerate(zip(items, tokenized)):
            if len(tok.ids) == tok.prompt_len:
                raise EmlensInputError(f"row {i}: position 'mean_response' needs a non-empty response "
                                       "(read prompts with position 'last_prompt')")


def iter_batches(handle, tokenized: Sequence[TokenizedItem], batch_size: int) -> Iterator[Batch]:
    """Batches of similar length (little padding); each batch remembers which rows it holds."""
    order = sorted(range(len(tokenized)), key=lambda i: len(tokenized[i].ids))
    for start in range(0, len(order), batch_size):
        yield make_batch(tokenized, order[start:start + batch_size], handle.tokenizer.pad_token_id, handle.device)


def run_extraction(handle, items: Sequence[ExtractItem], sites: list[Site], position: str = "last_prompt",
                   backend: str | object = DEFAULT_BACKEND, batch_size: int = 16,
                   max_response_tokens: int | None = None, progress: bool = True
                   ) -> Iterator[tuple[list[int], list[int], dict[str, Tensor]]]:
    """Yield (rows, counts, {site: vectors}) batch by batch; vectors of a row are `counts[i]` consecutive rows."""
    check_position(position)
    tokenized = tokenize_items(handle, items, max_response_tokens)
    _check_items(items, tokenized, position)
    yield from run_tokenized(handle, tokenized, sites, position, backend, batch_size, progress)


def run_tokenized(handle, tokenized: Sequence[TokenizedItem], sites: list[Site], position: str,
                  backend: str | object = DEFAULT_BACKEND, batch_size: int = 16, progress: bool = True
                  ) -> Iterator[tuple[list[int], list[int], dict[str, Tensor]]]:
    runner = make_backend(handle, backend) if isinstance(backend, str) else backend
    counts = vector_counts(tokenized, position)
    bar = tqdm(total=len(tokenized), desc=f"extract ({runner.name})", unit="row", disable=not progress)
    with torch.inference_mode():
        for batch in iter_batches(handle, tokenized, batch_size):
            found = runner.run(batch, sites, position)
            yield batch.rows, [counts[r] for r in batch.rows], {k: v.to("cpu") for k, v in found.items()}
            bar.update(len(batch.rows))
    bar.close()


def extract_activations(handle, items: Sequence[ExtractItem], sites: list[Site] | Sequence[str],
                        position: str = "last_prompt", backend: str = DEFAULT_BACKEND, batch_size: int = 16,
                        max_response_tokens: int | None = None, progress: bool = False) -> dict[str, Tensor]:
    """In memory, in input order: {site name: (vectors, d_model)}. For small inputs; use `extract_to_store` else."""
    sites = _as_sites(handle, sites)
    parts: dict[str, list[tuple[int, Tensor]]] = {s.name: [] for s in sites}
    for rows, counts, found in run_extraction(handle, items, sites, position, backend, batch_size,
                                              max_response_tokens, progress):
        for name, vectors in found.items():
            for row, chunk in zip(rows, vectors.split(counts)):
                parts[name].append((row, chunk))
    return {name: torch.cat([c for _, c in sorted(chunks, key=lambda x: x[0])]) for name, chunks in parts.items()}


def _as_sites(handle, sites) -> list[Site]:
    if sites and all(isinstance(s, Site) for s in sites):
        return sorted(sites)
    return resolve_sites(sites, handle.n_layers)


# ---------------------------------------------------------------- the activation store


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ActivationStoreWriter:
    """Writes vectors shard by shard into a temporary folder that replaces `folder` only on `close()`.

    Each site has one preallocated shard buffer of `shard_mb / n_sites` MB that is filled in place and written
    when full, so the writer's memory is bounded by `shard_mb` whatever the number of rows.
    """

    def __init__(self, folder: str | Path, sites: list[str], d_model: int, manifest: dict,
                 dtype: str = "float32", shard_mb: float = 32.0):
        if dtype not in _DTYPES:
            raise EmlensInputError(f"dtype '{dtype}': expected one of {', '.join(_DTYPES)}")
        self.folder = Path(folder)
        if self.folder.exists() and any(self.folder.iterdir()) and not (self.folder / "manifest.json").exists():
            raise EmlensInputError(f"{self.folder}: exists and is not an activation store (refusing to replace it)")
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.folder.parent, prefix=f".{self.folder.name}.tmp-"))
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it private; the finished folder is not
        self.sites, self.d_model, self.manifest = list(sites), d_model, dict(manifest)
        self.dtype = dtype
        itemsize = torch.empty(0, dtype=_DTYPES[dtype]).element_size()
        self.capacity = max(1, int(shard_mb * 2**20) // (len(self.sites) * d_model * itemsize))  # vectors per shard
        self.buffer: dict[str, Tensor] | None = None  # allocated on first use (pages are touched as they fill)
        self.filled = 0
        self.index_rows: list[dict] = []
        self.n_vectors = 0  # written and buffered
        self.shard_starts: list[int] = []
        self.flushed_vectors = 0

    def add(self, rows_meta: list[dict], counts: list[int], vectors: dict[str, Tensor]) -> None:
        """Append a batch: one meta dict and vector count per row; `vectors[site]` has sum(counts) rows."""
        missing = set(self.sites) - set(vectors)
        if missing:
            raise RuntimeError(f"store: batch lacks sites {sorted(missing)}")
        n = sum(counts)
        if self.filled + n > self.capacity:
            self.flush()
        shard = len(self.shard_starts)
        for meta, count in zip(rows_meta, counts):
            self.index_rows.append({**meta, "shard": shard, "vector_start": self.n_vectors, "n_vectors": count})
            self.n_vectors += count
        if n > self.capacity:  # one batch larger than a shard ('all' tokens of long rows): its own shard
            self._write({site: vectors[site].to(_DTYPES[self.dtype]).contiguous() for site in self.sites}, n)
            return
        if self.buffer is None:
            self.buffer = {site: torch.empty(self.capacity, self.d_model, dtype=_DTYPES[self.dtype])
                           for site in self.sites}
        for site in self.sites:
            self.buffer[site][self.filled:self.filled + n] = vectors[site]
        self.filled += n

    def _write(self, tensors: dict[str, Tensor], n: int) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(self.tmp / f"shard-{len(self.shard_starts):05d}.safetensors"))
        self.shard_starts.append(self.flushed_vectors)
        self.flushed_vectors += n

    def flush(self) -> None:
        if not self.filled:
            return
        self._write({site: buf[:self.filled] for site, buf in self.buffer.items()}, self.filled)
        self.filled = 0

    def close(self) -> "ActivationStore":
        from .runs import atomic_write_table, versions

        self.flush()
        index = pd.DataFrame(self.index_rows)
        if "row" in index.columns:
            index = index.sort_values("row", kind="stable").reset_index(drop=True)
        atomic_write_table(index, self.tmp / "index.parquet")
        manifest = {**self.manifest, "kind": "activation_store", "format": STORE_FORMAT, "sites": self.sites,
                    "d_model": self.d_model, "dtype": self.dtype, "n_rows": len(index), "n_vectors": self.n_vectors,
                    "shards": [{"file": f"shard-{i:05d}.safetensors", "vector_start": s}
                               for i, s in enumerate(self.shard_starts)],
                    "versions": versions(), "created": time.time()}
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.replace(self.tmp, self.folder)
        return ActivationStore(self.folder)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None:
            self.abort()


class ActivationStore:
    """Read a store: `.index` (one row per input row, in input order), `.load(site)` -> (vectors, d_model)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.exists():
            raise EmlensInputError(f"{self.folder}: not an activation store (no manifest.json)")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("kind") != "activation_store":
            raise EmlensInputError(f"{path}: not an activation store (kind={self.manifest.get('kind')!r})")
        self.index = pd.read_parquet(self.folder / "index.parquet")

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def position(self) -> str:
        return self.manifest["position"]

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    def __len__(self) -> int:
        return len(self.index)

    def _check_site(self, site: str) -> None:
        if site not in self.sites:
            raise EmlensInputError(f"{self.folder}: no site '{site}' in this store (it has "
                                   f"{self.sites[0]} ... {self.sites[-1]}, {len(self.sites)} sites)")

    def load(self, site: str, rows: Sequence[int] | None = None) -> Float[Tensor, "vec d_model"]:
        """All vectors of one site in index order (or those of `rows`, positions in the index), as float32."""
        from safetensors import safe_open

        self._check_site(site)
        chunks = []
        for shard in self.manifest["shards"]:
            with safe_open(str(self.folder / shard["file"]), framework="pt") as f:
                chunks.append(f.get_tensor(site))
        flat = torch.cat(chunks).float() if chunks else torch.zeros(0, self.d_model)
        index = self.index if rows is None else self.index.iloc[list(rows)]
        starts, counts = index["vector_start"].to_numpy(), index["n_vectors"].to_numpy()
        if (counts == 1).all():
            return flat[torch.tensor(starts, dtype=torch.long)]
        return torch.cat([flat[s:s + c] for s, c in zip(starts, counts)])

    def vector_rows(self, rows: Sequence[int] | None = None) -> Int[Tensor, " vec"]:
        """For each vector `load` returns, the position of its row in the index (token -> row for 'all')."""
        index = self.index if rows is None else self.index.iloc[list(rows)]
        counts = torch.tensor(index["n_vectors"].to_numpy(), dtype=torch.long)
        return torch.repeat_interleave(torch.arange(len(index)), counts)


def extract_to_store(handle, items: Sequence[ExtractItem], out: str | Path, sites: list[Site] | Sequence[str],
                     position: str = "last_prompt", backend: str = DEFAULT_BACKEND, batch_size: int = 16,
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
