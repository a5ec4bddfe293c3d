"""Fitting directions and probes in memory: difference of means, logistic, ridge, PCA of paired differences."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin

from emlens.base.errors import EmlensInputError
from emlens.sites import parse_site

# ---------------------------------------------------------------- fitting


@dataclass
class LayerFit:
    direction: np.ndarray  # unit
    raw_norm: float
    metrics: dict
    extras: dict[str, np.ndarray] = field(default_factory=dict)


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def _folds(groups: np.ndarray, folds: int):
    from sklearn.model_selection import GroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise EmlensInputError(f"probe: only {n_groups} prompt group(s); held-out metrics need at least 2")
    return GroupKFold(n_splits=min(folds, n_groups))


def _pair_differences(X: np.ndarray, y: np.ndarray, pairs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """pos - neg for every pair key present on both sides among `rows`."""
    positive = {pairs[i]: i for i in rows if y[i] == 1}
    negative = {pairs[i]: i for i in rows if y[i] == 0}
    common = [k for k in positive if k in negative]
    if not common:
        raise EmlensInputError("pca_pairs: no positive/negative pairs share a pair key (the two sides must read "
                               "the same questions)")
    return np.stack([X[positive[k]] - X[negative[k]] for k in common])


def _top_direction(diffs: np.ndarray) -> tuple[np.ndarray, float]:
    """First principal axis of the (uncentred) paired differences, signed along their mean.

    Uncentred on purpose: centring would remove the mean difference, which is the signal shared by the pairs.
    """
    _, singular, vt = np.linalg.svd(diffs, full_matrices=False)
    energy = float((singular ** 2).sum())
    if energy == 0:
        return np.zeros(diffs.shape[1]), float("nan")
    axis = vt[0]
    if axis @ diffs.mean(0) < 0:
        axis = -axis
    return _unit(axis), float(singular[0] ** 2 / energy)


class IsotropicScaler(TransformerMixin, BaseEstimator):
    """Centre, then divide by ONE scalar (the RMS of the centred entries).

    Unlike per-feature standardisation this treats every direction of the residual stream alike (a rotation
    of the activations rotates the fitted coefficients), so an L2-penalised probe's weight vector stays a
    meaningful direction; the scalar only keeps the regularisation strength comparable across layers.
    """

    def fit(self, X, y=None):
        self.mean_ = X.mean(0)
        self.scale_ = float(np.sqrt(((X - self.mean_) ** 2).mean())) or 1.0
        return self

    def transform(self, X):
        return (X - self.mean_) / self.scale_

    def fold(self, coef: np.ndarray, intercept: float) -> tuple[np.ndarray, float]:
        """Coefficients on scaled inputs -> coefficients on raw activations."""
        raw = coef / self.scale_
        return raw, float(intercept - raw @ self.mean_)


class _Scorer:
    """Fit on training rows, score held-out rows; higher score = more positive."""

    def __init__(self, method: str, regularization: float, seed: int):
        self.method, self.c, self.seed = method, regularization, seed

    def fit(self, X, y, pairs, rows):
        from sklearn.linear_model import LogisticRegression

        Xt, yt = X[rows], y[rows]
        if self.method == "logistic":
            self.scaler = IsotropicScaler().fit(Xt)
            self.model = LogisticRegression(C=self.c, max_iter=5000, random_state=self.seed)
            self.model.fit(self.scaler.transform(Xt), yt)
            self.threshold = 0.0
            return self
        if self.method == "pca_pairs":
            self.w, _ = _top_direction(_pair_differences(X, y, pairs, rows))
        else:
            self.w = Xt[yt == 1].mean(0) - Xt[yt == 0].mean(0)
        self.threshold = float((Xt[yt == 1].mean(0) @ self.w + Xt[yt == 0].mean(0) @ self.w) / 2)
        return self

    def score(self, X):
        return self.model.decision_function(self.scaler.transform(X)) if self.method == "logistic" else X @ self.w

    def raw_coef(self) -> tuple[np.ndarray, float]:
        """The logistic probe in raw activation space: logit = x @ coef + intercept."""
        return self.scaler.fold(self.model.coef_[0], float(self.model.intercept_[0]))


def auroc(y: np.ndarray, scores: np.ndarray) -> float:
    """Binary AUROC as the Mann-Whitney U over average ranks (ties count a half): sklearn's roc_auc_score without
    its input validation, which costs more than the small fits it scores here (thousands per direction)."""
    from scipy.stats import rankdata

    positive = np.asarray(y) == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _separation(scores: np.ndarray, y: np.ndarray) -> float:
    pos, neg = scores[y == 1], scores[y == 0]
    pooled = np.sqrt((pos.var() + neg.var()) / 2) if len(pos) > 1 and len(neg) > 1 else 0.0
    return float((pos.mean() - neg.mean()) / pooled) if pooled > 0 else float("nan")


def classification_metrics(X, y, groups, pairs, method: str, folds: int, regularization: float, seed: int) -> dict:
    """Held-out AUROC, accuracy and separation (d') of the method's scores, folds split by prompt group."""
    aurocs, accuracies, separations = [], [], []
    for train, test in _folds(groups, folds).split(X, y, groups):
        if len(np.unique(y[train])) < 2:
            continue
        scorer = _Scorer(method, regularization, seed).fit(X, y, pairs, train)
        scores = scorer.score(X[test])
        accuracies.append(float(((scores > scorer.threshold) == (y[test] == 1)).mean()))
        if len(np.unique(y[test])) == 2:
            aurocs.append(auroc(y[test], scores))
            separations.append(_separation(scores, y[test]))
    return {"auroc": float(np.mean(aurocs)) if aurocs else float("nan"),
            "auroc_std": float(np.std(aurocs)) if aurocs else float("nan"),
            "accuracy": float(np.mean(accuracies)) if accuracies else float("nan"),
            "separation": float(np.nanmean(separations)) if np.isfinite(separations).any() else float("nan"),
            "folds": len(accuracies)}


def fit_classification_layer(X, y, groups, pairs, method: str, folds: int, regularization: float,
                             seed: int) -> LayerFit:
    metrics = classification_metrics(X, y, groups, pairs, method, folds, regularization, seed)
    mean_pos, mean_neg = X[y == 1].mean(0), X[y == 0].mean(0)
    diff = mean_pos - mean_neg
    extras = {"mean_positive": mean_pos, "mean_negative": mean_neg}
    all_rows = np.arange(len(y))
    if method == "diff_of_means":
        direction = _unit(diff)
    elif method == "pca_pairs":
        direction, explained = _top_direction(_pair_differences(X, y, pairs, all_rows))
        metrics["explained_variance"] = explained
    else:
        coef, intercept = _Scorer("logistic", regularization, seed).fit(X, y, pairs, all_rows).raw_coef()
        direction = _unit(coef)
        extras.update(coef=coef, intercept=np.array(intercept))
    metrics["cos_with_mean_diff"] = float(direction @ _unit(diff))
    return LayerFit(direction, float(np.linalg.norm(diff)), metrics, extras)


def fit_ridge_layer(X, y, groups, folds: int, alpha: float, seed: int) -> LayerFit:
    """Ridge onto a score: pooled out-of-fold R^2 and Pearson r (folds by prompt group)."""
    from scipy.stats import pearsonr
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(IsotropicScaler(), Ridge(alpha=alpha))
    predicted = cross_val_predict(model, X, y, groups=groups, cv=_folds(groups, folds))
    constant = np.std(predicted) == 0 or np.std(y) == 0
    metrics = {"r2": float(r2_score(y, predicted)),
               "pearson_r": float("nan") if constant else float(pearsonr(y, predicted)[0]),
               "score_mean": float(y.mean()), "score_std": float(y.std())}
    model.fit(X, y)
    coef, intercept = model[0].fold(model[-1].coef_, float(model[-1].intercept_))
    # The natural scale: how far the mean activation moves per standard deviation of the score.
    centred = y - y.mean()
    slope = (X - X.mean(0)).T @ centred / max((centred ** 2).sum(), 1e-12)
    return LayerFit(_unit(coef), float(np.linalg.norm(slope) * y.std()), metrics,
                    {"coef": coef, "intercept": np.array(intercept), "mean": X.mean(0)})


def best_layer_metrics(metrics: pd.DataFrame, nested: dict) -> tuple[int, dict]:
    """The best layer and what an artifact records of it: its row of the per-layer table (chosen on the same
    folds it is scored on) and the nested-CV estimate of the selected layer's metric (see `nested_selection`)."""
    best = best_layer(metrics)
    row = metrics.loc[metrics["layer"] == best].iloc[0].to_dict()
    return best, {**{k: v for k, v in row.items() if k not in ("site", "method")}, **nested,
                  "selection": "best layer's metrics are from the folds that picked it; *_nested is nested CV"}


def best_layer(metrics: pd.DataFrame) -> int:
    """By held-out AUROC (ties: larger held-out separation), or by held-out R^2 for regressions."""
    if "r2" in metrics:
        return int(metrics.loc[metrics["r2"].fillna(-np.inf).idxmax(), "layer"])
    ranked = metrics.assign(_a=metrics["auroc"].fillna(-1).round(4), _s=metrics["separation"].fillna(-np.inf))
    return int(ranked.sort_values(["_a", "_s"], ascending=False, kind="stable").iloc[0]["layer"])


def nested_selection(acts: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray, pairs: np.ndarray | None,
                     method: str, folds: int = 5, regularization: float = 1.0, seed: int = 0) -> dict:
    """The best layer's held-out metric without the selection's optimism: in each outer fold (by prompt group) the
    layer is picked by an inner CV on the outer training rows alone, then scored on the outer test rows.

    The per-layer metrics (and so `best_metrics`) pick the best layer on the same folds they report, which
    overstates it when many layers are tried; this is the estimate to quote for "the best layer".
    """
    pairs = np.arange(len(y)) if pairs is None else pairs
    names, key = list(acts), ("r2" if method == "ridge" else "auroc")
    scores, chosen = [], []
    for train, test in _folds(groups, folds).split(y, y, groups):
        if len(np.unique(groups[train])) < 2 or (method != "ridge" and (len(np.unique(y[train])) < 2
                                                                        or len(np.unique(y[test])) < 2)):
            continue
        inner = dict(zip(names, each_layer(_inner_metric, [(acts[name][train], y[train], groups[train], pairs[train],
                                                            method, folds, regularization, seed) for name in names]),
                         strict=True))
        best = max(names, key=lambda name: (np.nan_to_num(inner[name], nan=-np.inf), -names.index(name)))
        scores.append(_outer_score(acts[best], y, pairs, train, test, method, regularization, seed))
        chosen.append(parse_site(best, 10**6).layer)
    return {f"{key}_nested": float(np.mean(scores)) if scores else float("nan"), "nested_folds": len(scores),
            "nested_layers": chosen}


def _inner_metric(X, y, groups, pairs, method, folds, regularization, seed) -> float:
    if method == "ridge":
        return fit_ridge_layer(X, y, groups, folds, regularization, seed).metrics["r2"]
    return classification_metrics(X, y, groups, pairs, method, folds, regularization, seed)["auroc"]


def _outer_score(X, y, pairs, train, test, method, regularization, seed) -> float:
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline

    if method == "ridge":
        model = make_pipeline(IsotropicScaler(), Ridge(alpha=regularization)).fit(X[train], y[train])
        return float(r2_score(y[test], model.predict(X[test])))
    scorer = _Scorer(method, regularization, seed).fit(X, y, pairs, train)
    return auroc(y[test], scorer.score(X[test]))


NULL_PERMUTATIONS = 5  # label shuffles per layer: the per-layer metric's null, drawn as a band beside it


def shuffled_labels(y: np.ndarray, pairs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels with the link to the activations broken: swapped at random within each positive / negative pair where
    the data come in pairs (a paired method keeps its pairs), else permuted across rows."""
    ids, counts = np.unique(pairs, return_counts=True)
    if len(ids) < len(y) and (counts == 2).all():
        flip = dict(zip(ids, rng.random(len(ids)) < 0.5, strict=True))
        return np.where([flip[p] for p in pairs], 1 - y, y)
    return rng.permutation(y)


def shuffled_null(X, y, groups, pairs, method: str, folds: int, regularization: float, seed: int) -> dict:
    """The held-out metric (AUROC, or R^2 for a regression) of the same fit on shuffled labels: its mean and range
    over NULL_PERMUTATIONS shuffles (`auroc_null`, `auroc_null_low`, `auroc_null_high`)."""
    rng = np.random.default_rng(seed + 7919)
    key = "r2" if method == "ridge" else "auroc"
    values = []
    for _ in range(NULL_PERMUTATIONS):
        shuffled = shuffled_labels(y, pairs, rng)
        if method == "ridge":
            values.append(fit_ridge_layer(X, shuffled, groups, folds, regularization, seed).metrics["r2"])
        else:
            values.append(classification_metrics(X, shuffled, groups, pairs, method, folds, regularization, seed)[key])
    values = np.array(values, dtype=float)
    if not np.isfinite(values).any():
        return {f"{key}_null": float("nan"), f"{key}_null_low": float("nan"), f"{key}_null_high": float("nan")}
    return {f"{key}_null": float(np.nanmean(values)), f"{key}_null_low": float(np.nanmin(values)),
            f"{key}_null_high": float(np.nanmax(values))}


def fit_sites(acts: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray, pairs: np.ndarray | None,
              method: str, folds: int = 5, regularization: float = 1.0, seed: int = 0,
              progress: bool = False) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Fit every site (name -> (n, d_model) activations): stacked tensors (layers first) and per-layer metrics."""
    pairs = np.arange(len(y)) if pairs is None else pairs
    settings = (y, groups, pairs, method, folds, regularization, seed)
    fitted = each_layer(_fit_site, [(name, X, *settings) for name, X in acts.items()], progress, f"fit ({method})")
    fits, records = zip(*fitted, strict=True)
    tensors = {"directions": np.stack([f.direction for f in fits]), "raw_norm": np.array([f.raw_norm for f in fits]),
               "layers": np.array([r["layer"] for r in records])}
    for key in fits[0].extras:
        tensors[key] = np.stack([f.extras[key] for f in fits])
    return tensors, pd.DataFrame(list(records))


def _fit_site(name: str, X, y, groups, pairs, method: str, folds: int, regularization: float,
              seed: int) -> tuple[LayerFit, dict]:
    """One site's fit and its row of the per-layer table (with its shuffled-label null)."""
    if method == "ridge":
        fit = fit_ridge_layer(X, y, groups, folds, regularization, seed)
    else:
        fit = fit_classification_layer(X, y, groups, pairs, method, folds, regularization, seed)
    counts = {} if method == "ridge" else {"n_positive": int((y == 1).sum()), "n_negative": int((y == 0).sum())}
    return fit, {"layer": parse_site(name, 10**6).layer, "site": name, "method": method, "n": len(y), **counts,
                 "n_groups": int(len(np.unique(groups))), **fit.metrics, "raw_norm": fit.raw_norm,
                 **shuffled_null(X, y, groups, pairs, method, folds, regularization, seed)}


MAX_FIT_WORKERS = 8  # each layer's fits are small and single-threaded: one process per core, up to this many


def each_layer(function, arguments: list[tuple], progress: bool = False, desc: str = "") -> list:
    """`function(*args)` for every layer's arguments, in order, spread over the cores this process may use (the
    results are those of a loop: every fit is seeded by its arguments alone)."""
    from tqdm import tqdm

    workers = min(len(os.sched_getaffinity(0)), MAX_FIT_WORKERS, len(arguments))
    if workers < 2:
        return [function(*args) for args in tqdm(arguments, desc=desc, disable=not progress)]
    from joblib import Parallel, delayed

    results = Parallel(n_jobs=workers, return_as="generator")(delayed(function)(*args) for args in arguments)
    return list(tqdm(results, total=len(arguments), desc=desc, disable=not progress))
