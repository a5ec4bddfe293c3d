"""A direction in SAE latents, each statistic beside the same statistic for random directions.

- Decoder cosine: the latents whose decoder vector points most along the direction. Control: the |cosine| at
  each rank for random unit directions (its 95th percentile), so "latent 812 has cosine 0.41" can be read
  against what the best latent of a random direction reaches.
- Attribution: the direction's contrast data (its probe spec's two sides, rebuilt and read again at the SAE's
  site) gives each latent's mean activation difference df_i; latent i explains df_i (d_i . v) of the
  projection (mean_pos - mean_neg) . v of the class-mean difference on the unit direction v (the SAE's error
  term is the rest). Control: the same attribution onto random unit directions, as a share of |mean_pos -
  mean_neg| (its 95th percentile at each rank).
- Contexts: the top latents' most-activating tokens in the contrast prompts, highlighted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from emlens.base.errors import EmlensInputError
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
from emlens.directions.artifact import Direction
from emlens.directions.probe_data import contrast_data
from emlens.directions.specs import ProbeSpec, SpecContext
from emlens.model import Model
from emlens.sae.artifact import LoadedSAE
from emlens.sae.labels import with_labels
from emlens.sae.latents import TokenActivations, token_activations, top_contexts

N_RANDOM = 200


@dataclass
class Decomposition:
    """Tables of one direction's decomposition (see the module doc); `summary` holds the headline figures."""

    cosine: pd.DataFrame
    attribution: pd.DataFrame | None
    contexts: pd.DataFrame
    summary: dict = field(default_factory=dict)


def unit_rows(matrix: Tensor) -> Tensor:
    return matrix / matrix.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def random_units(n: int, width: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return unit_rows(torch.randn(n, width, generator=generator))


def ranked_control(values: Tensor, top: int) -> Tensor:
    """(top,) the 95th percentile over random directions of the |value| at each rank (rows: directions)."""
    ranked = values.abs().sort(dim=1, descending=True).values[:, :top]
    return torch.quantile(ranked, 0.95, dim=0)


def decoder_cosines(loaded: LoadedSAE, vector: Tensor, top: int = 10, n_random: int = N_RANDOM, seed: int = 0
                    ) -> tuple[pd.DataFrame, dict]:
    """The `top` latents by |cosine| of decoder vector and direction, beside the random-direction control."""
    decoder = unit_rows(loaded.decoder)
    cosines = decoder @ unit_rows(vector.float()[None])[0]
    control = ranked_control(random_units(n_random, loaded.d_in, seed) @ decoder.T, top)
    order = cosines.abs().argsort(descending=True)[:top]
    table = pd.DataFrame({"rank": range(1, len(order) + 1), "latent": order.numpy(),
                          "cosine": cosines[order].numpy(), "random_p95": control[:len(order)].numpy()})
    summary = {"max_abs_cosine": float(cosines.abs().max()), "random_max_abs_cosine_p95": float(control[0]),
               "latents_above_random": int((cosines.abs() > control[0]).sum())}
    return table, summary


def attribution(loaded: LoadedSAE, vector: Tensor, positive: Tensor, negative: Tensor, top: int = 10,
                n_random: int = N_RANDOM, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Each latent's share of the class-mean difference along the direction, beside random directions."""
    unit = unit_rows(vector.float()[None])[0]
    mean_difference = positive.float().mean(0) - negative.float().mean(0)
    latent_difference = loaded.encode(positive).mean(0) - loaded.encode(negative).mean(0)
    decoder = loaded.decoder
    per_latent = latent_difference * (decoder @ unit)
    total = float(mean_difference @ unit)
    scale = float(mean_difference.norm())
    random_per_latent = latent_difference[None] * (random_units(n_random, loaded.d_in, seed) @ decoder.T)
    control = ranked_control(random_per_latent / scale, top)
    order = per_latent.abs().argsort(descending=True)[:top]
    table = pd.DataFrame({"rank": range(1, len(order) + 1), "latent": order.numpy(),
                          "activation_difference": latent_difference[order].numpy(),
                          "decoder_cosine": unit_rows(decoder[order]) @ unit,
                          "attribution": per_latent[order].numpy(), "share": (per_latent[order] / total).numpy(),
                          "share_of_norm": (per_latent[order].abs() / scale).numpy(),
                          "random_p95_share_of_norm": control[:len(order)].numpy()})
    summary = {"projection": total, "difference_norm": scale, "explained_by_latents": float(per_latent.sum() / total),
               f"top{top}_share": float(per_latent[order].sum() / total),
               "top1_share_of_norm": float(per_latent.abs().max() / scale),
               "random_top1_share_of_norm_p95": float(control[0])}
    return table, summary


def contrast_tokens(direction: Direction, handle: Model, site, limit: int | None, data_root: str | Path | None,
                    progress: bool) -> tuple[TokenActivations, np.ndarray, str]:
    """The direction's contrast prompts read again at `site` (every token), their labels and pooling position."""
    spec_data = direction.cfg.model_dump().get("spec")
    if not spec_data or not spec_data.get("contrast"):
        raise EmlensInputError(f"{direction.path}: no contrast spec in its cfg.json (attribution needs the two "
                               "sides a direction was fitted on)")
    spec = ProbeSpec(**spec_data)
    spec_file = Path(direction.cfg.model_dump().get("spec_file") or direction.path or ".")
    data = contrast_data(spec, SpecContext(spec_file, Path(data_root) if data_root else None), limit)
    tokens = token_activations(handle, data.items, site, batch_size=spec.batch_size,
                               max_response_tokens=spec.max_response_tokens, progress=progress)
    return tokens, data.y, spec.position


def decompose_direction(loaded: LoadedSAE, direction: Direction, handle: Model, top: int = 10,
                        contexts_per_latent: int = 5, limit: int | None = None, data_root: str | Path | None = None,
                        n_random: int = N_RANDOM, seed: int = 0, progress: bool = False,
                        latent_labels: dict[int, str] | None = None) -> Decomposition:
    """Decoder cosines and attribution of `direction` (at the SAE's layer) with random controls and contexts;
    `latent_labels` (latent -> explanation, `emlens sae explain`) become a `label` column of each table."""
    site = loaded.check_fits(handle)
    if direction.cfg.site_kind != site.kind:
        raise EmlensInputError(f"{direction.path}: direction read at {direction.cfg.site_kind}, the SAE at {site.name}")
    if site.layer not in direction.layers:
        raise EmlensInputError(f"{direction.path}: no vector at layer {site.layer}, the SAE's layer")
    vector = direction.vector(site.layer)
    cosine, summary = decoder_cosines(loaded, vector, top, n_random, seed)
    tokens, labels, position = contrast_tokens(direction, handle, site, limit, data_root, progress)
    pooled = tokens.pooled(position)
    table, attribution_summary = attribution(loaded, vector, pooled[labels == 1], pooled[labels == 0], top,
                                             n_random, seed)
    latents = list(dict.fromkeys([*cosine.latent[:3], *table.latent[:3]]))
    contexts = top_contexts(loaded, tokens, latents, handle.tokenizer, contexts_per_latent)
    summary = {"direction": str(direction.path), "layer": site.layer, "site": site.name, "n_random": n_random,
               "n_positive": int((labels == 1).sum()), "n_negative": int((labels == 0).sum()),
               "cosine": summary, "attribution": attribution_summary}
    return Decomposition(with_labels(cosine, latent_labels), with_labels(table, latent_labels),
                         with_labels(contexts, latent_labels), summary)


DECOMPOSITION_KIND = "sae_decomposition"


def save_decomposition(decomposition: Decomposition, out: str | Path, force: bool = False) -> Path:
    """OUT/cfg.json (the summary), cosine.csv, attribution.csv, contexts.csv and decomposition.png, atomically."""
    with atomic_folder(out, DECOMPOSITION_KIND, force) as tmp:
        decomposition.cosine.to_csv(tmp / "cosine.csv", index=False)
        decomposition.attribution.to_csv(tmp / "attribution.csv", index=False)
        decomposition.contexts.to_csv(tmp / "contexts.csv", index=False)
        decomposition_figure(decomposition, tmp / "decomposition.png")
        atomic_write_json(tmp / CFG_FILE, {"kind": DECOMPOSITION_KIND, "format_version": FORMAT_VERSION,
                                           **decomposition.summary, "versions": versions()})
    return Path(out)


def decomposition_figure(decomposition: Decomposition, path: Path) -> None:
    """The top latents' |cosine| and |attribution share of the difference norm|, the random 95th percentile dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, table, value, control, title in (
            (axes[0], decomposition.cosine, "cosine", "random_p95", "|decoder cosine|"),
            (axes[1], decomposition.attribution, "share_of_norm", "random_p95_share_of_norm",
             "|attribution| / |mean difference|")):
        labels = [str(latent) for latent in table.latent]
        ax.bar(labels, table[value].abs(), color="tab:blue", label="direction")
        ax.plot(labels, table[control], "k--", marker=".", label="random directions, 95th pct")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("latent (by rank)")
        ax.tick_params(axis="x", labelsize=7, rotation=60)
        ax.legend(fontsize=7)
    fig.suptitle(f"{Path(decomposition.summary['direction']).name} in SAE latents at {decomposition.summary['site']}",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


@register_artifact(DECOMPOSITION_KIND)
def open_decomposition(folder: Path) -> Decomposition:
    """`em.load(OUT)` of `emlens sae decompose`."""
    folder = Path(folder)
    return Decomposition(pd.read_csv(folder / "cosine.csv"), pd.read_csv(folder / "attribution.csv"),
                         pd.read_csv(folder / "contexts.csv"), read_json(folder / CFG_FILE))
