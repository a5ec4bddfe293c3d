"""Compare directions across checkpoints: cosines per layer, drift along a series, projections of activations.

Every cosine is reported beside a random baseline: the 95th percentile of |cos| between two independent
uniformly random unit vectors in d_model dimensions (cos^2 of such a pair is Beta(1/2, (d-1)/2) distributed;
about 1.96/sqrt(d), 0.082 for d_model 576). A cosine below it is indistinguishable from unrelated directions.
Residual streams are not isotropic, so with `--store` a second baseline is drawn from the activations
themselves: the 95th percentile of |cos| between difference-of-means directions of random balanced splits of
the stores' rows (`random_contrast_p95`, per layer); a pair is `above_random` only above both.

    emlens compare artifacts/directions/evil-base artifacts/directions/evil-insecure --out artifacts/compare/evil

writes `cosine.parquet` (every pair x layer), `drift.parquet` (each checkpoint against the previous and the
first, in the order given), `projection.parquet` (with --store: each store's activations projected onto each
direction), `compare.png` (heatmap checkpoints x layers against the first, and checkpoint x checkpoint at the
first one's best layer), `drift.png` and `cfg.json` (kind comparison: the inputs and the cosines at the best layer).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from emlens.base.errors import EmlensInputError
from emlens.base.io import (
    CFG_FILE,
    FORMAT_VERSION,
    atomic_folder,
    atomic_write_json,
    atomic_write_table,
    check_writable_folder,
    read_table,
    register_artifact,
    save_figure,
)
from emlens.capture.extract import activations
from emlens.capture.store import ActivationStore
from emlens.directions.artifact import Direction
from emlens.model import Model

RESULTS_VERSION = 2  # 2: the random-contrast baseline; bump when a change alters what a comparison holds: `emlens run` then redoes finished stages

COMPARISON_KIND = "comparison"


def random_cosine_quantile(d_model: int, q: float = 0.95) -> float:
    """The q-quantile of |cos| between two independent random unit vectors in d_model dimensions."""
    from scipy.stats import beta

    return float(np.sqrt(beta.ppf(q, 0.5, (d_model - 1) / 2)))


def random_contrast_quantile(loaded: Sequence[np.ndarray], draws: int = 200, q: float = 0.95, seed: int = 0) -> float:
    """The q-quantile of |cos| between the difference-of-means directions of two independent random balanced splits
    of activations (rows of the first and of the last matrix given; one matrix: two splits of it): the baseline an
    anisotropic residual stream gives directions that mean nothing."""
    rng = np.random.default_rng(seed)

    def contrasts(X: np.ndarray) -> np.ndarray:
        signs = np.where(rng.random((draws, len(X))).argsort(1) < len(X) // 2, 1.0, -1.0)
        diffs = signs @ (X - X.mean(0))
        return diffs / np.maximum(np.linalg.norm(diffs, axis=1, keepdims=True), 1e-12)

    a, b = contrasts(loaded[0]), contrasts(loaded[-1])
    return float(np.quantile(np.abs((a * b).sum(1)), q))


def contrast_baselines(stores: Sequence[ActivationStore], direction: Direction) -> dict[int, float]:
    """random_contrast_quantile at each of the direction's layers every store holds."""
    return {layer: random_contrast_quantile([store.load(direction.site(layer)).double().numpy() for store in stores])
            for layer in direction.layers if stores and all(direction.site(layer) in store.sites for store in stores)}


def artifact_names(paths: Sequence[Path]) -> list[str]:
    """Folder names, made unique with their parent folder where two share a name."""
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    return names


def check_comparable(directions: Sequence[Direction], names: Sequence[str], force: bool = False) -> None:
    """Same width always; same base model and site kind unless forced."""
    ref, ref_name = directions[0], names[0]
    for d, name in zip(directions[1:], names[1:], strict=False):
        if d.d_model != ref.d_model:
            raise EmlensInputError(f"{name}: width {d.d_model} differs from {ref_name} ({ref.d_model}); directions "
                                   "of different model families cannot be compared")
        if force:
            continue
        base, ref_base = d.cfg.model.get("base_fingerprint"), ref.cfg.model.get("base_fingerprint")
        if base and ref_base and base != ref_base:
            raise EmlensInputError(f"{name}: fitted on another base model (base fingerprint {base}, {ref_name} has "
                                   f"{ref_base}); pass --force to compare anyway")
        if d.site_kind != ref.site_kind:
            raise EmlensInputError(f"{name}: site kind {d.site_kind} differs from {ref_name} ({ref.site_kind}); "
                                   "pass --force to compare anyway")


def _common_layers(a: Direction, b: Direction) -> list[int]:
    return sorted(set(a.layers) & set(b.layers))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def cosine_table(directions: Sequence[Direction], names: Sequence[str],
                 contrast: dict[int, float] | None = None) -> pd.DataFrame:
    """cos(a, b) at every common layer for every pair, with the random baseline beside it (and, per layer, the
    random-contrast baseline of the activations when given)."""
    baseline = random_cosine_quantile(directions[0].d_model)
    rows = []
    for i in range(len(directions)):
        for j in range(i + 1, len(directions)):
            a, b = directions[i], directions[j]
            for layer in _common_layers(a, b):
                value = cosine(a.vector(layer), b.vector(layer))
                row = {"a": names[i], "b": names[j], "layer": layer, "cosine": value, "random_p95": baseline}
                if contrast is not None:
                    row["random_contrast_p95"] = contrast.get(layer, float("nan"))
                bar = max(baseline, np.nan_to_num(row.get("random_contrast_p95", baseline), nan=baseline))
                rows.append({**row, "above_random": abs(value) > bar})
    return pd.DataFrame(rows)


def drift_table(directions: Sequence[Direction], names: Sequence[str]) -> pd.DataFrame:
    """Along a series in the order given: each direction's cosine to the previous, the first and the last."""
    baseline = random_cosine_quantile(directions[0].d_model)
    first, last = directions[0], directions[-1]
    rows = []
    for t, (d, name) in enumerate(zip(directions, names, strict=False)):
        previous = directions[t - 1] if t else d
        for layer in _common_layers(first, d):
            v = d.vector(layer)
            rows.append({"step": t, "checkpoint": name, "layer": layer,
                         "cos_to_previous": cosine(v, previous.vector(layer)) if layer in previous.layers else np.nan,
                         "cos_to_first": cosine(v, first.vector(layer)),
                         "cos_to_last": cosine(v, last.vector(layer)) if layer in last.layers else np.nan,
                         "raw_norm": d.raw_norm(layer), "random_p95": baseline})
    return pd.DataFrame(rows)


def projection_table(stores: Sequence[tuple[str, ActivationStore]], directions: Sequence[Direction],
                     names: Sequence[str], seed: int = 0) -> pd.DataFrame:
    """Each store's activations projected onto each direction at every layer both have.

    With a binary `y` column in the store index (stores written by `emlens probe fit --store`), reports the
    class means and the AUROC of the projection, beside the AUROC of a seeded random unit direction.
    """
    from sklearn.metrics import roc_auc_score

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for store_name, store in stores:
        if store.d_model != directions[0].d_model:
            raise EmlensInputError(f"{store.folder}: width {store.d_model} differs from the directions' "
                                   f"{directions[0].d_model}")
        y = store.index["y"].to_numpy()[store.vector_rows().numpy()] if "y" in store.index else None
        binary = y is not None and set(np.unique(y)) == {0.0, 1.0}
        for direction, name in zip(directions, names, strict=False):
            for layer in direction.layers:
                site = direction.site(layer)
                if site not in store.sites:
                    continue
                acts = store.load(site)
                proj = direction.project(acts, layer).numpy()
                row = {"store": store_name, "direction": name, "layer": layer, "site": site, "n": len(proj),
                       "mean": float(proj.mean()), "std": float(proj.std())}
                if binary:
                    noise = torch.randn(acts.shape[1], generator=generator, dtype=torch.float64)
                    random_proj = (acts.double() @ (noise / noise.norm())).numpy()
                    row.update(mean_positive=float(proj[y == 1].mean()), mean_negative=float(proj[y == 0].mean()),
                               auroc=float(roc_auc_score(y, proj)),
                               auroc_random_direction=float(roc_auc_score(y, random_proj)))
                rows.append(row)
    return pd.DataFrame(rows)


def plot_cosines(directions: Sequence[Direction], names: Sequence[str], table: pd.DataFrame, out: Path) -> Path:
    """Left: checkpoints x layers heatmap of cos with the first; right: checkpoint x checkpoint at its best layer."""

    import matplotlib.pyplot as plt

    ref = directions[0]
    layers = ref.layers
    baseline = random_cosine_quantile(ref.d_model)
    grid = np.full((len(directions) - 1, len(layers)), np.nan)
    for r, name in enumerate(names[1:]):
        part = table[(table.a == names[0]) & (table.b == name)].set_index("layer")["cosine"]
        grid[r] = [part.get(layer, np.nan) for layer in layers]
    best = ref.best_layer
    square = np.array([[cosine(a.vector(best), b.vector(best)) if best in a.layers and best in b.layers else np.nan
                        for b in directions] for a in directions])

    values = np.concatenate([grid[~np.isnan(grid)], square[~np.isnan(square)]])
    if values.min() >= 0:  # checkpoints of one model mostly agree: spread the colours over what is there
        cmap, vmin = "viridis", float(np.floor(values.min() * 20) / 20)
    else:
        cmap, vmin = "RdBu_r", -1.0
    style = dict(cmap=cmap, vmin=vmin, vmax=1.0, interpolation="nearest")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 1.6 + 0.5 * max(len(directions), 3)),
                                      gridspec_kw={"width_ratios": [3, 1.2]}, constrained_layout=True)
    image = left.imshow(grid, aspect="auto", **style)
    left.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    left.set_yticks(range(len(names) - 1), names[1:], fontsize=8)
    left.set_xlabel("layer")
    left.set_title(f"cos with {names[0]} (x: |cos| <= random p95 = {baseline:.3f})", fontsize=9)
    if len(layers) <= 40:
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                left.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, rotation=90 if len(layers) > 12
                          else 0, color=_text_colour(value, cmap, vmin))
    below = np.argwhere(np.abs(np.nan_to_num(grid)) <= baseline)
    if len(below):
        left.scatter(below[:, 1], below[:, 0], marker="x", color="black", s=12)
    right.imshow(square, **style)
    right.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    right.set_yticks(range(len(names)), names, fontsize=7)
    for (i, j), value in np.ndenumerate(square):
        right.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                   color=_text_colour(value, cmap, vmin))
    right.set_title(f"at layer {best}", fontsize=9)
    fig.colorbar(image, ax=[left, right], shrink=0.8, label="cosine")
    save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


def _text_colour(value: float, cmap: str, vmin: float) -> str:
    if cmap == "viridis":  # dark at the low end
        return "white" if (value - vmin) / max(1.0 - vmin, 1e-9) < 0.6 else "black"
    return "white" if abs(value) > 0.6 else "black"


def plot_drift(drift: pd.DataFrame, layer: int, out: Path) -> Path:

    import matplotlib.pyplot as plt

    part = drift[drift.layer == layer].sort_values("step")
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(part.step, part.cos_to_first, "o-", label="cos to first")
    ax.plot(part.step, part.cos_to_previous, "s--", label="cos to previous")
    ax.axhline(part.random_p95.iloc[0], color="grey", ls=":", label="random p95")
    ax.set_xticks(part.step, part.checkpoint, rotation=30, ha="right", fontsize=7)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel(f"cosine at layer {layer}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


def compare_directions(paths: Sequence[str | Path], out: str | Path, stores: Sequence[str | Path] = (),
                       force: bool = False) -> dict[str, pd.DataFrame]:
    """`emlens compare`: tables and figures for two or more direction artifacts (in series order)."""

    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise EmlensInputError("compare: give at least two direction folders")
    directions = [Direction.load(p) for p in paths]
    names = artifact_names(paths)
    check_comparable(directions, names, force)
    opened = [(artifact_names([Path(s)])[0], ActivationStore(s)) for s in stores]
    check_writable_folder(out, COMPARISON_KIND)  # before the projections, which read whole stores
    projection = projection_table(opened, directions, names) if opened else None  # checks the stores' width
    contrast = contrast_baselines([store for _, store in opened], directions[0]) if opened else None
    tables = {"cosine": cosine_table(directions, names, contrast), "drift": drift_table(directions, names)}
    if projection is not None:
        tables["projection"] = projection
    best = directions[0].best_layer
    at_best = tables["cosine"][tables["cosine"].layer == best]
    summary = {"kind": COMPARISON_KIND, "format_version": FORMAT_VERSION, "directions": [str(p) for p in paths],
               "names": names, "d_model": directions[0].d_model,
               "random_p95": random_cosine_quantile(directions[0].d_model), "reference_best_layer": best,
               "random_contrast_p95_at_best_layer": (contrast or {}).get(best),
               "cosine_at_best_layer": at_best[["a", "b", "cosine"]].to_dict("records"),
               "stores": [str(s) for s in stores], "created": time.time()}
    with atomic_folder(out, COMPARISON_KIND) as tmp:  # written whole: a kill leaves the old comparison or none
        for name, table in tables.items():
            atomic_write_table(table, tmp / f"{name}.parquet")
        plot_cosines(directions, names, tables["cosine"], tmp / "compare.png")
        plot_drift(tables["drift"], best, tmp / "drift.png")
        atomic_write_json(tmp / CFG_FILE, summary)
    return tables


def compare(*directions: Direction | str | Path, names: Sequence[str] | None = None,
            force: bool = False) -> pd.DataFrame:
    """`em.compare(a, b, ...)`: cos(a, b) per common layer for every pair, beside the random 95th percentile.

    Directions may be in memory or artifact folders; names default to the directions' own names.
    """
    loaded = [d if isinstance(d, Direction) else Direction.load(d) for d in directions]
    if len(loaded) < 2:
        raise EmlensInputError("compare: give at least two directions")
    names = list(names) if names is not None else [d.name for d in loaded]
    if len(set(names)) < len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    check_comparable(loaded, names, force)
    return cosine_table(loaded, names)


def compare_models(a: tuple[Model, Direction], b: tuple[Model, Direction], prompts: Sequence,
                   controls: int = 100, seed: int = 0) -> pd.DataFrame:
    """Directions of two models compared by what they read, so widths and tokenizers may differ (SmolLM2 vs
    Gemma): each model reads the same prompts at its direction's site and position, the activations are
    projected on its own direction, and the two projections are rank-correlated over prompts (Spearman), layer
    against the layer of the other model at the nearest relative depth. Beside each, the control: the 95th
    percentile of |Spearman| between the projections on `controls` pairs of seeded random unit directions, one
    in each model (what any two directions' readings share on these prompts).
    """
    if len(prompts) < 3:
        raise EmlensInputError(f"compare_models: {len(prompts)} prompts; a rank correlation needs at least 3")
    (model_a, dir_a), (model_b, dir_b) = a, b
    proj_a, random_a = _projections(model_a, dir_a, prompts, controls, seed)
    proj_b, random_b = _projections(model_b, dir_b, prompts, controls, seed + 1)
    rows = []
    for layer_a in dir_a.layers:
        depth = layer_a / max(model_a.n_layers - 1, 1)
        layer_b = min(dir_b.layers, key=lambda layer: abs(layer / max(model_b.n_layers - 1, 1) - depth))
        null = np.abs(_spearman(random_a[layer_a], random_b[layer_b]))
        rows.append({"layer_a": layer_a, "layer_b": layer_b, "depth_a": round(depth, 3),
                     "depth_b": round(layer_b / max(model_b.n_layers - 1, 1), 3), "n": len(prompts),
                     "spearman": float(_spearman(proj_a[layer_a][:, None], proj_b[layer_b][:, None])[0]),
                     "random_p95": float(np.quantile(null, 0.95)), "controls": controls})
    return pd.DataFrame(rows)


def _spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho between matching columns of two (n, k) arrays."""
    from scipy.stats import rankdata

    ranks_a, ranks_b = rankdata(a, axis=0), rankdata(b, axis=0)
    ranks_a, ranks_b = ranks_a - ranks_a.mean(0), ranks_b - ranks_b.mean(0)
    return (ranks_a * ranks_b).sum(0) / np.sqrt((ranks_a ** 2).sum(0) * (ranks_b ** 2).sum(0))


def _projections(model: Model, direction: Direction, prompts: Sequence, controls: int, seed: int
                 ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per layer, the prompts' projections on the direction (n,) and on `controls` seeded random unit vectors
    (n, controls)."""
    if direction.d_model != model.d_model:
        raise EmlensInputError(f"{direction.path or direction.name}: width {direction.d_model} differs from the "
                               f"model's ({model.d_model})")
    acts = activations(model, list(prompts), sites=[direction.site(layer) for layer in direction.layers],
                       position=direction.cfg.position or "last_prompt")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(direction.d_model, controls, generator=generator, dtype=torch.float64)
    noise = noise / noise.norm(dim=0)
    projected = {layer: direction.project(acts[direction.site(layer)], layer).numpy() for layer in direction.layers}
    random = {layer: (acts[direction.site(layer)].double() @ noise).numpy() for layer in direction.layers}
    return projected, random


@register_artifact(COMPARISON_KIND, whole=True)
def open_comparison(folder: Path) -> dict[str, pd.DataFrame]:
    """`em.load(OUT)` of `emlens compare`: its tables (cosine, drift, projection) by name."""
    return {path.stem: read_table(path) for path in sorted(Path(folder).glob("*.parquet"))}
