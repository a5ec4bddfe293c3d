"""Activation patching and attribution patching: where in the network a fine-tune's behaviour is carried.

Two forms of a pair of runs on the same continuations:
- adapter: the donor run is the model with its adapter, the receiving run the same loaded model with the adapter
  disabled, both on the same token sequences;
- prompt pairs (every item has a `donor_prompt`): the donor run is the model as loaded on the donor prompt (a nudged
  chat, a corrupted prompt), the receiving run the same model on the item's own prompt. The continuation's tokens
  and the last prompt token correspond one to one; prompt tokens do only where both prompts have the same length.
Each cell (layer x site x position group) re-runs the receiving model with the donor's activation at that cell, and
reads a metric that needs no judge: log P(target) - log P(alternative) of two continuations of the same prompt (for
EM: a misaligned and an aligned answer). The cell's normalised effect is mean(patched - receiving) /
mean(donor - receiving) over prompts: 0 as the receiving run, 1 as the donor run, with a bootstrap CI over prompts.
Sites are resid_pre, attn_out, mlp_out and `heads` (each attention head's output, read at the input of the
attention's output projection, as TransformerLens's hook_z). TransformerLens's and nnsight's patching tutorials
read the same quantity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm import tqdm

from emlens.base.errors import EmlensInputError
from emlens.base.io import save_figure
from emlens.model import Model
from emlens.sites import check_site_kind, head_layout, hook_heads, hook_site

SITES = ("resid_pre", "attn_out", "mlp_out")  # and "heads": every attention head of the layer, one cell each
HEAD = "head."  # a head's cell: site "head.3"
POSITIONS = ("all", "prompt", "last", "response")  # every token, the prompt's, its last one, the continuation's


@dataclass
class PatchItem:
    prompt: str | list[dict]  # text, or a chat (templated with the generation prompt)
    target: str  # the continuation the metric favours (the donor's behaviour, e.g. a misaligned answer)
    alternative: str  # the other continuation (e.g. an aligned answer)
    donor_prompt: str | list[dict] | None = None  # the donor run's prompt (prompt pairs); None: the adapter is


@dataclass
class _Batch:
    ids: Tensor  # (2n, L): per item its prompt + target, then its prompt + alternative; right-padded
    attention: Tensor
    groups: dict[str, Tensor]  # position group -> (2n, L) bool
    continuation: Tensor  # (2n, L) bool: the continuation's tokens, whose log-probabilities the metric sums
    prompt_lengths: Tensor  # (2n,)


@dataclass
class _Runs:
    """The receiving run's and the donor run's batches, and how the donor's positions map onto the receiving's."""

    receiving: _Batch
    donor: _Batch
    adapter: bool  # the donor is the adapter (the receiving run disables it); else the donor is the other prompt

    def receiving_context(self, handle: Model):
        return handle.model.disable_adapter() if self.adapter else nullcontext()

    def aligned(self, donor: Tensor) -> Tensor:
        """The donor's activation (2n, L_donor, d) at the receiving run's positions (2n, L, d): shifted by the
        difference of the prompts' lengths, so that the continuation and the last prompt token meet."""
        if self.adapter:
            return donor
        width = self.receiving.ids.shape[1]
        shift = (self.donor.prompt_lengths - self.receiving.prompt_lengths).to(donor.device)[:, None]
        index = (torch.arange(width, device=donor.device)[None] + shift).clamp(0, donor.shape[1] - 1)
        return donor.gather(1, index[..., None].expand(-1, -1, donor.shape[2]))


def _encode_runs(handle: Model, items: Sequence[PatchItem]) -> _Runs:
    receiving = encode_items(handle, items)
    if items[0].donor_prompt is None:
        return _Runs(receiving, receiving, adapter=True)
    return _Runs(receiving, encode_items(handle, items, donor=True), adapter=False)


def _check_pairs(handle: Model, items: Sequence[PatchItem], positions: Sequence[str]) -> None:
    """One form for all items; prompt positions only where the two prompts of each pair have one length."""
    pairs = [item.donor_prompt is not None for item in items]
    if any(pairs) and not all(pairs):
        raise EmlensInputError("patch items: either every item has a donor_prompt (prompt pairs) or none does "
                               f"(the adapter is the donor); items {[i for i, p in enumerate(pairs) if not p]} have none")
    if not all(pairs) or not {"all", "prompt"} & set(positions):
        return
    for i, item in enumerate(items):
        lengths = [len(_prompt_ids(handle, prompt)) for prompt in (item.donor_prompt, item.prompt)]
        if lengths[0] != lengths[1]:
            raise EmlensInputError(
                f"patch item {i}: positions 'all' and 'prompt' need the donor and receiving prompts of the same "
                f"length ({lengths[0]} vs {lengths[1]} tokens); patch 'last' and 'response' only")


def _prompt_ids(handle: Model, prompt: str | list[dict]) -> list[int]:
    text = prompt if isinstance(prompt, str) else handle.chat_text(prompt)
    return handle.tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_items(handle: Model, items: Sequence[PatchItem], donor: bool = False) -> _Batch:
    """The batch a run reads: per item its prompt (or donor prompt) + target, then + alternative; right-padded."""
    rows, prompt_lengths = [], []
    for i, item in enumerate(items):
        prompt = _prompt_ids(handle, item.donor_prompt if donor else item.prompt)
        for continuation in (item.target, item.alternative):
            tokens = handle.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not prompt or not tokens:
                raise EmlensInputError(f"patch item {i}: an empty prompt or continuation")
            rows.append(prompt + tokens)
            prompt_lengths.append(len(prompt))
    ids, attention = right_padded(rows, handle.tokenizer.pad_token_id or 0)
    width = ids.shape[1]
    position = torch.arange(width)[None]
    prompt_length, length = torch.tensor(prompt_lengths)[:, None], attention.sum(1, keepdim=True)
    prompt = position < prompt_length
    continuation = (position >= prompt_length) & (position < length)
    groups = {"all": prompt | continuation, "prompt": prompt, "last": position == prompt_length - 1,
              "response": continuation}
    device = handle.device
    return _Batch(ids.to(device), attention.to(device), {k: v.to(device) for k, v in groups.items()},
                  continuation.to(device), prompt_length[:, 0])


def _metric(handle: Model, batch: _Batch) -> np.ndarray:
    logits = handle.model(input_ids=batch.ids, attention_mask=batch.attention).logits
    return _item_metric(logits, batch).cpu().numpy()


def right_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token rows of unequal length as one right-padded batch: (ids, attention mask)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)], attention[r, :len(row)] = torch.tensor(row), 1
    return ids, attention


def _item_metric(logits: Tensor, batch: _Batch) -> Tensor:
    """Per item: log P(target | prompt) - log P(alternative | prompt), teacher-forced. Only the positions that
    predict a continuation token are normalised over the vocabulary (a full-width log-softmax cost a patched
    forward a fifth of its time on the embedded model)."""
    rows, positions = batch.continuation[:, 1:].nonzero(as_tuple=True)
    predicted = batch.ids[rows, positions + 1]
    logprobs = logits[rows, positions].float().log_softmax(-1).gather(-1, predicted[:, None])[:, 0]
    summed = torch.zeros(len(logits), dtype=logprobs.dtype, device=logprobs.device).index_add(0, rows, logprobs)
    return summed[0::2] - summed[1::2]


@torch.inference_mode()
def patch(handle: Model, items: Sequence[PatchItem], layers: Sequence[int] | None = None,
          sites: Sequence[str] = SITES, positions: Sequence[str] = POSITIONS, n_boot: int = 1000,
          seed: int = 0, cells: Sequence[tuple[int, str]] | None = None,
          on_cell: Callable[[list[dict]], None] | None = None, progress: bool = False) -> pd.DataFrame:
    """Activation patching from the donor run into the receiving run (see the module's docstring for the two
    forms), every cell of layers x sites x positions (or only the (layer, site) `cells` given; a head's site is
    `head.H`). Rows: layer, site, positions, effect, ci_low, ci_high (normalised), delta (mean patched - receiving
    metric), total (mean donor - receiving), n (prompts). `on_cell(rows)` is called as each (layer, site) cell
    finishes (a run saves them there)."""
    grid = grid_cells(handle, items, layers, sites, positions)
    cells = grid if cells is None else [tuple(cell) for cell in cells]
    runs = _encode_runs(handle, items)
    donor_acts, donor = _record(handle, runs, cells)
    rows = []
    with runs.receiving_context(handle):
        receiving = _metric(handle, runs.receiving)
        for layer, site in tqdm(cells, desc="patch", disable=not progress):
            done = []
            for group in positions:
                with _patched(handle, layer, site, donor_acts[_read_at(layer, site)], runs.receiving.groups[group]):
                    patched = _metric(handle, runs.receiving)
                done.append({"layer": layer, "site": site, "positions": group,
                             **_effect(patched - receiving, donor - receiving, n_boot, seed)})
            if on_cell is not None:
                on_cell(done)
            rows += done
    return pd.DataFrame(rows)


def attribute(handle: Model, items: Sequence[PatchItem], layers: Sequence[int] | None = None,
              sites: Sequence[str] = SITES, positions: Sequence[str] = POSITIONS, n_boot: int = 1000,
              seed: int = 0) -> pd.DataFrame:
    """Attribution patching: every cell of `patch`'s grid estimated to first order, the gradient of the receiving
    run's metric at the cell times (donor - receiving activation), summed over the cell's positions: one forward
    pass of the donor and one forward and one backward pass of the receiving run for the whole grid. The same
    columns as `patch` (delta and effect are the estimates). Rank with it, then patch the top cells exactly."""
    cells = grid_cells(handle, items, layers, sites, positions)
    runs = _encode_runs(handle, items)
    with torch.inference_mode():
        donor_acts, donor = _record(handle, runs, cells)
    with runs.receiving_context(handle):
        receiving_acts, receiving, grads = _gradients(handle, runs.receiving, cells)
    rows = []
    for layer, site in cells:
        at = _read_at(layer, site)
        change = (donor_acts[at] - receiving_acts[at]) * grads[at] * _channels(handle, site, donor_acts[at])
        for group in positions:
            per_row = (change * runs.receiving.groups[group][..., None]).sum((1, 2)).cpu().numpy()
            estimate = per_row[0::2] + per_row[1::2]  # an item's metric reads both its rows
            rows.append({"layer": layer, "site": site, "positions": group,
                         **_effect(estimate, donor - receiving, n_boot, seed)})
    return pd.DataFrame(rows)


def agreement(exact: pd.DataFrame, estimated: pd.DataFrame) -> dict:
    """How well attribution ranks the cells exact patching measured: Spearman of their effects over the cells both
    read (n cells)."""
    from scipy.stats import spearmanr

    cells = ["layer", "site", "positions"]
    both = exact.merge(estimated, on=cells, suffixes=("_exact", "_estimated")).dropna(
        subset=["effect_exact", "effect_estimated"])
    rho = spearmanr(both.effect_exact, both.effect_estimated).statistic if len(both) > 2 else float("nan")
    return {"spearman": float(rho), "n_cells": len(both)}


def grid_cells(handle: Model, items: Sequence[PatchItem], layers, sites, positions) -> list[tuple[int, str]]:
    """The grid's (layer, site) cells, after checking the request (a donor: an adapter or donor prompts; known
    layers, sites and position groups). The site `heads` stands for every head of the layer (`head.0` ...)."""
    if not items:
        raise EmlensInputError("patch: no items (prompt, target, alternative)")
    _check_pairs(handle, items, positions)
    if items[0].donor_prompt is None and (not handle.adapter or not hasattr(handle.model, "disable_adapter")):
        raise EmlensInputError("patch: the model has no adapter to patch from (load it with --adapter), and the "
                               "items have no donor_prompt")
    layers = list(range(handle.n_layers)) if layers is None else list(layers)
    if any(not 0 <= layer < handle.n_layers for layer in layers):
        raise EmlensInputError(f"patch layers {layers}: the model has layers 0-{handle.n_layers - 1}")
    unknown = sorted(set(positions) - set(POSITIONS))
    if unknown:
        raise EmlensInputError(f"patch positions {unknown}: known are {', '.join(POSITIONS)}")
    return [(layer, cell) for layer in layers for cell in _site_cells(handle, sites)]


def _site_cells(handle: Model, sites: Sequence[str]) -> list[str]:
    cells = []
    for site in sites:
        if site == "heads":
            cells += [f"{HEAD}{h}" for h in range(head_layout(handle.base_model)[0])]
        elif site.startswith(HEAD):
            heads = head_layout(handle.base_model)[0]
            if not site.removeprefix(HEAD).isdigit() or int(site.removeprefix(HEAD)) >= heads:
                raise EmlensInputError(f"patch site '{site}': the model has heads {HEAD}0-{heads - 1}")
            cells.append(site)
        else:
            check_site_kind(handle.base_model, site)
            cells.append(site)
    return cells


def _read_at(layer: int, site: str) -> tuple[int, str]:
    """Where a cell's activation is read: every head of a layer shares its attention's concatenated head outputs."""
    return (layer, "z") if site.startswith(HEAD) else (layer, site)


def _hook(handle: Model, at: tuple[int, str], change: Callable[[Tensor], Tensor | None]):
    layer, site = at
    return hook_heads(handle.base_model, layer, change) if site == "z" else hook_site(handle.base_model, layer, site, change)


def _channels(handle: Model, site: str, like: Tensor) -> Tensor:
    """The channels a cell owns at its read point (bool, last dimension): a head's slice of z, or all of them."""
    if not site.startswith(HEAD):
        return torch.ones(like.shape[-1], dtype=torch.bool, device=like.device)
    head_dim, head = head_layout(handle.base_model)[1], int(site.removeprefix(HEAD))
    mask = torch.zeros(like.shape[-1], dtype=torch.bool, device=like.device)
    mask[head * head_dim:(head + 1) * head_dim] = True
    return mask


def _gradients(handle: Model, batch: _Batch, cells: list[tuple[int, str]]) -> tuple[dict, np.ndarray, dict]:
    """The receiving run's activation at every cell's read point, its metric, and the metric's gradient there."""
    seen: dict[tuple[int, str], Tensor] = {}

    def keep(at):
        def read(hidden: Tensor) -> None:
            hidden.retain_grad()
            seen[at] = hidden
        return read

    hooks = [_hook(handle, at, keep(at)) for at in dict.fromkeys(_read_at(*cell) for cell in cells)]
    try:
        with torch.enable_grad():
            embeds = handle.base_model.get_input_embeddings()(batch.ids).detach().requires_grad_()
            metric = _item_metric(handle.model(inputs_embeds=embeds, attention_mask=batch.attention).logits, batch)
            metric.sum().backward()
    finally:
        for hook in hooks:
            hook.remove()
    return ({at: t.detach() for at, t in seen.items()}, metric.detach().cpu().numpy(),
            {at: t.grad for at, t in seen.items()})


def _record(handle: Model, runs: _Runs, cells: list[tuple[int, str]]) -> tuple[dict, np.ndarray]:
    """The donor's activation at every cell's read point (at the receiving run's positions), and its metric."""
    seen: dict[tuple[int, str], Tensor] = {}
    hooks = [_hook(handle, at, _keep(seen, at)) for at in dict.fromkeys(_read_at(*cell) for cell in cells)]
    try:
        metric = _metric(handle, runs.donor)
    finally:
        for hook in hooks:
            hook.remove()
    return {at: runs.aligned(t) for at, t in seen.items()}, metric


def _keep(seen: dict, at: tuple[int, str]):
    def read(hidden: Tensor) -> None:
        seen[at] = hidden.detach().clone()
    return read


class _patched:
    """The donor's values at one cell's positions (and a head's channels), in place of the receiving run's."""

    def __init__(self, handle: Model, layer: int, site: str, donor: Tensor, where: Tensor):
        self.handle, self.at, self.donor = handle, _read_at(layer, site), donor
        self.where = where[..., None] & _channels(handle, site, donor)

    def __enter__(self):
        self.hook = _hook(self.handle, self.at, lambda hidden: torch.where(self.where, self.donor.to(hidden.dtype), hidden))
        return self

    def __exit__(self, *exc) -> None:
        self.hook.remove()


def _effect(delta: np.ndarray, total: np.ndarray, n_boot: int, seed: int) -> dict:
    """The normalised effect mean(delta) / mean(total) with a bootstrap CI over prompts (NaN where the donor and
    the receiving run do not differ)."""
    n = len(delta)
    mean_total = float(total.mean())
    effect = float(delta.mean()) / mean_total if mean_total else float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = delta[draws].mean(1) / total[draws].mean(1)
    low, high = (np.nanpercentile(boot, [2.5, 97.5]) if np.isfinite(boot).any() else (float("nan"),) * 2)
    return {"effect": effect, "ci_low": float(low), "ci_high": float(high), "delta": float(delta.mean()),
            "total": mean_total, "n": n}


def patch_figure(table: pd.DataFrame, path: Path, title: str = "activation patching") -> Path:
    """One heat-map per position group: sites x layers, the normalised effect (0 receiving, 1 donor)."""
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(table.positions))
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 1.2 + 0.9 * len(groups) * table.site.nunique() / 2),
                             squeeze=False)
    for ax, group in zip(axes[:, 0], groups, strict=True):
        grid = table[table.positions == group].pivot(index="site", columns="layer", values="effect")
        image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_yticks(range(len(grid.index)), grid.index)
        ax.set_xticks(range(len(grid.columns)), grid.columns, fontsize=6)
        ax.set_title(f"{title}: {group} positions (n={int(table.n.iloc[0])} prompts)", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.02)
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
