"""Model diffing in SAE latents: on the same prompts, which latents' mean activation changes most between a
base model and a fine-tune (or each checkpoint of a series), with bootstrap CIs over prompts.

The control is a paired sign-flip null: if fine-tuning changed nothing, each prompt's change is as likely to
be negated, so the 95th percentile of the largest |mean change| over all latents under random sign flips is
the threshold a latent must pass (family-wise over every latent). `above_null` marks those that do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import Tensor

from emlens.base.io import (
    CFG_FILE,
    FORMAT_VERSION,
    atomic_folder,
    atomic_write_json,
    read_json,
    register_artifact,
    save_figure,
    versions,
)
from emlens.capture.items import ExtractItem
from emlens.model import Model
from emlens.sae.artifact import LoadedSAE
from emlens.sae.labels import with_labels
from emlens.sae.latents import latent_row_means, token_activations, top_contexts

N_BOOT = 1000


@dataclass
class LatentDiff:
    """`table`: per compared model, the top latents by |change| with CI and null; `contexts` their top tokens
    in that model; `summary`: per model, the null threshold and how many latents pass it."""

    table: pd.DataFrame
    contexts: pd.DataFrame
    summary: dict = field(default_factory=dict)


def bootstrap_mean_ci(changes: Tensor, n_boot: int = N_BOOT, seed: int = 0) -> tuple[Tensor, Tensor]:
    """95 % percentile CI of the mean over rows of (rows, latents), resampling rows, all latents at once."""
    generator = torch.Generator().manual_seed(seed)
    n = len(changes)
    picks = torch.randint(0, n, (n_boot, n), generator=generator)
    weights = torch.zeros(n_boot, n).scatter_add_(1, picks, torch.ones(n_boot, n)) / n
    means = weights @ changes
    return torch.quantile(means, 0.025, dim=0), torch.quantile(means, 0.975, dim=0)


def sign_flip_threshold(changes: Tensor, n_boot: int = N_BOOT, seed: int = 0) -> float:
    """95th percentile of max over latents of |mean change| when each row's change has a random sign."""
    generator = torch.Generator().manual_seed(seed + 1)
    signs = torch.randint(0, 2, (n_boot, len(changes)), generator=generator).float() * 2 - 1
    return float(torch.quantile((signs @ changes / len(changes)).abs().max(dim=1).values, 0.95))


def diff_models(loaded: LoadedSAE, models: dict[str, Model], items: Sequence[ExtractItem], top: int = 20,
                contexts_per_latent: int = 5, n_boot: int = N_BOOT, seed: int = 0, max_response_tokens: int | None = None,
                progress: bool = False, latent_labels: dict[int, str] | None = None) -> LatentDiff:
    """`models`: name -> model, the first the base. Every other one is compared with the base, prompt by prompt.
    `latent_labels` (latent -> explanation, `emlens sae explain`) become a `label` column of both tables."""
    names = list(models)
    site = loaded.check_fits(models[names[0]])
    tokens = {name: token_activations(handle, items, site, max_response_tokens=max_response_tokens, progress=progress)
              for name, handle in models.items()}
    means = {name: latent_row_means(loaded, found) for name, found in tokens.items()}
    base = means[names[0]]
    tables, contexts, summary = [], [], {}
    for name in names[1:]:
        changes = means[name] - base
        mean_change = changes.mean(0)
        low, high = bootstrap_mean_ci(changes, n_boot, seed)
        threshold = sign_flip_threshold(changes, n_boot, seed)
        order = mean_change.abs().argsort(descending=True)[:top]
        tables.append(pd.DataFrame({
            "model": name, "rank": range(1, len(order) + 1), "latent": order.numpy(),
            "base_mean": base.mean(0)[order].numpy(), "model_mean": means[name].mean(0)[order].numpy(),
            "change": mean_change[order].numpy(), "ci_low": low[order].numpy(), "ci_high": high[order].numpy(),
            "above_null": (mean_change[order].abs() > threshold).numpy()}))
        summary[name] = {"n_prompts": len(changes), "null_threshold": threshold,
                         "latents_above_null": int((mean_change.abs() > threshold).sum()),
                         "max_abs_change": float(mean_change.abs().max())}
        found = top_contexts(loaded, tokens[name], order[:min(5, top)].tolist(), models[name].tokenizer,
                             contexts_per_latent)
        contexts.append(found.assign(model=name))
    return LatentDiff(with_labels(pd.concat(tables, ignore_index=True), latent_labels),
                      with_labels(pd.concat(contexts, ignore_index=True), latent_labels),
                      {"site": site.name, "base": names[0], "n_boot": n_boot, "models": summary})


DIFF_KIND = "sae_diff"


def save_diff(diff: LatentDiff, out: str | Path, force: bool = False) -> Path:
    """OUT/cfg.json (the summary), diff.csv, contexts.csv and diff.png, atomically."""
    with atomic_folder(out, DIFF_KIND, force) as tmp:
        diff.table.to_csv(tmp / "diff.csv", index=False)
        diff.contexts.to_csv(tmp / "contexts.csv", index=False)
        diff_figure(diff, tmp / "diff.png")
        atomic_write_json(tmp / CFG_FILE, {"kind": DIFF_KIND, "format_version": FORMAT_VERSION, **diff.summary,
                                           "versions": versions()})
    return Path(out)


def diff_figure(diff: LatentDiff, path: Path) -> None:
    """Per compared model: the top latents' mean change with 95 % CI, the sign-flip null threshold dashed."""
    models = list(diff.summary["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.4), squeeze=False)
    for ax, name in zip(axes[0], models):
        part = diff.table[diff.table.model == name]
        labels = [str(latent) for latent in part.latent]
        errors = [part.change - part.ci_low, part.ci_high - part.change]
        ax.bar(labels, part.change, yerr=errors, color=["tab:red" if a else "tab:gray" for a in part.above_null])
        threshold = diff.summary["models"][name]["null_threshold"]
        for sign in (1, -1):
            ax.axhline(sign * threshold, color="k", linestyle="--", linewidth=0.8)
        ax.set_title(f"{name} - {diff.summary['base']} (dashed: sign-flip null, 95th pct)", fontsize=8)
        ax.set_xlabel("latent")
        ax.set_ylabel("mean activation change")
        ax.tick_params(axis="x", labelsize=7, rotation=60)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


@register_artifact(DIFF_KIND)
def open_diff(folder: Path) -> LatentDiff:
    """`em.load(OUT)` of `emlens sae diff`."""
    folder = Path(folder)
    return LatentDiff(pd.read_csv(folder / "diff.csv"), pd.read_csv(folder / "contexts.csv"),
                      read_json(folder / CFG_FILE))
