"""`fit_direction`: a direction or probe from activations in memory (no spec file, nothing written to disk).

    acts = em.activations(model, prompts, sites="resid_post", position="last_prompt")
    refusal = em.fit_direction(acts, labels, groups=prompt_ids, method="diff_of_means")
    refusal.save("artifacts/directions/refusal")        # when you want the artifact

Held-out metrics are cross-validated with folds split by `groups` (one id per prompt), so the rows of one prompt
(its nudged variants, its tokens) are never on both sides of a split.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from emlens.base.errors import EmlensInputError
from emlens.base.io import content_hash, versions
from emlens.directions.artifact import Direction, DirectionConfig, LinearProbe, RegressionProbe
from emlens.directions.fitting import best_layer_metrics, fit_sites, nested_selection
from emlens.sites import parse_site

Method = Literal["diff_of_means", "logistic", "ridge", "pca_pairs"]
ARTIFACT_CLASS = {"logistic": LinearProbe, "ridge": RegressionProbe}


def _as_array(values, what: str, n: int) -> np.ndarray:
    array = np.asarray(values.cpu() if isinstance(values, Tensor) else values)
    if array.ndim != 1 or len(array) != n:
        raise EmlensInputError(f"fit_direction: {what} has shape {array.shape}, expected ({n},) (one per row)")
    return array


def fit_direction(acts: Mapping[str, Tensor], labels: Sequence | np.ndarray | Tensor, groups=None,
                  method: Method = "diff_of_means", pairs=None, folds: int = 5, regularization: float = 1.0,
                  seed: int = 0, name: str = "direction", progress: bool = False) -> Direction:
    """Fit a direction per site from activations keyed by site name (all of one site kind).

    `labels`: 1 / 0 per row (the two sides of a contrast), or a score per row for `method="ridge"`.
    `groups`: a prompt id per row for the held-out split (default: every row its own prompt).
    `pairs`: for `pca_pairs`, the key that pairs a positive row with a negative one.
    The result carries the model's provenance when `acts` came from `em.activations` (an `Activations`).
    """
    if not acts:
        raise EmlensInputError("fit_direction: no activations (acts is empty)")
    sites = sorted((parse_site(s, 10**6) for s in acts), key=lambda s: s.layer)
    if len({s.kind for s in sites}) != 1:
        raise EmlensInputError(f"fit_direction: one site kind per direction (got {sorted({s.kind for s in sites})})")
    matrices = {s.name: acts[s.name].detach().double().cpu().numpy() for s in sites}
    n = next(iter(matrices.values())).shape[0]
    y = _as_array(labels, "labels", n).astype(float)
    if method != "ridge" and not set(np.unique(y)) <= {0.0, 1.0}:
        raise EmlensInputError(f"fit_direction: method {method} needs labels 0 / 1 (use method='ridge' for scores)")
    groups = np.arange(n) if groups is None else _as_array(groups, "groups", n)
    pairs = None if pairs is None else _as_array(pairs, "pairs", n)
    tensors, metrics = fit_sites(matrices, y, groups, pairs, method, folds, regularization, seed, progress)
    best, best_metrics = best_layer_metrics(metrics, nested_selection(matrices, y, groups, pairs, method, folds,
                                                                      regularization, seed))
    model = getattr(acts, "model", None) or {}
    cfg = DirectionConfig(
        name=name, method=method, site_kind=sites[0].kind, layers=[s.layer for s in sites], best_layer=best,
        position=getattr(acts, "position", None), model=model,
        data={"hash": content_hash([y.tolist(), groups.tolist()]), "n": n, "n_groups": int(len(np.unique(groups))),
              **({} if method == "ridge" else {"n_positive": int((y == 1).sum()), "n_negative": int((y == 0).sum())})},
        best_metrics=best_metrics, seed=seed,
        folds=folds, regularization=regularization, sites=[s.name for s in sites], metrics=metrics.to_dict("records"),
        versions=versions(), created=time.time(),
    )
    kind = ARTIFACT_CLASS.get(method, Direction)
    return kind({k: torch.as_tensor(v, dtype=torch.long if k == "layers" else torch.float32)
                 for k, v in tensors.items()}, cfg, metrics=metrics)
