"""A judge calibrated to reference labels (GPT-4o's, in `../shared/data/judged`), and rates corrected for its error.

    emlens judge calibrate --data ../shared/data/judged --judge default --out CAL

A calibration holds, for one judge (its identity), on rows that carry reference `aligned` / `coherent` scores:
- per reference model (a CSV file) the counts of the misaligned label against the reference's (tp, fn, tn, fp),
  from out-of-sample predictions (the default judge refitted without that model; any other judge never saw them);
- sensitivity and specificity pooled over the models, each with a Wilson 95 % CI;
- monotone (isotonic) maps from the judge's aligned / coherent scores onto the reference scale.

A misaligned rate p is corrected by Rogan-Gladen, (p + spec - 1) / (sens + spec - 1), clipped to [0, 1]; its CI
carries the sample's uncertainty (a bootstrap over questions where they hold several samples, else over samples)
and the calibration's (sens and spec drawn from their Beta posteriors). `validate_calibration` says where that
holds: for each reference model, its rate corrected with the calibration of the OTHER models.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from emlens.base.errors import EmlensInputError
from emlens.base.io import CFG_FILE, PathLike, atomic_folder, atomic_write_json, read_json, register_artifact
from emlens.base.stats import wilson_ci

CALIBRATION_KIND = "judge_calibration"
COUNTS = ("tp", "fn", "tn", "fp")
DRAWS = 2000


class Calibration:
    """Per-model confusion counts of a judge's misaligned label, pooled sensitivity / specificity, isotonic maps."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.per_model = pd.DataFrame(cfg["per_model"])

    @property
    def judge_id(self) -> str:
        return self.cfg["judge"]["id"]

    def counts(self, leave_out: str | None = None) -> dict[str, int]:
        rows = self.per_model[self.per_model.model != leave_out] if leave_out else self.per_model
        return {k: int(rows[k].sum()) for k in COUNTS}

    def error_rates(self, leave_out: str | None = None) -> dict:
        c = self.counts(leave_out)
        sens, spec = _ratio(c["tp"], c["tp"] + c["fn"]), _ratio(c["tn"], c["tn"] + c["fp"])
        return {"sensitivity": sens, "sensitivity_ci": list(wilson_ci(c["tp"], c["tp"] + c["fn"])),
                "specificity": spec, "specificity_ci": list(wilson_ci(c["tn"], c["tn"] + c["fp"])), **c}

    def check_judge(self, judge_id: str, where: str) -> None:
        if judge_id != self.judge_id:
            raise EmlensInputError(f"{where}: calibration of judge '{self.judge_id}', not of '{judge_id}' "
                                   "(calibrate this judge: emlens judge calibrate)")

    def map_score(self, metric: str, values) -> np.ndarray:
        """The judge's `metric` scores on the reference scale (isotonic, clipped to the fitted range)."""
        knots = self.cfg["isotonic"][metric]
        return np.interp(np.asarray(values, dtype=float), knots["x"], knots["y"])

    def corrected(self, flags, clusters=None, leave_out: str | None = None, seed: int = 0) -> dict:
        """Rogan-Gladen corrected rate of the misaligned flags (NaN = not counted), with a CI over both the
        sample and the calibration."""
        return corrected_rate(flags, self.counts(leave_out), clusters, seed)

    def save(self, out: PathLike, force: bool = False) -> Path:
        with atomic_folder(out, CALIBRATION_KIND, force) as tmp:
            atomic_write_json(tmp / CFG_FILE, self.cfg)
        return Path(out)


def _ratio(k: int, n: int) -> float:
    return k / n if n else float("nan")


def rogan_gladen(p, sensitivity, specificity):
    """(p + spec - 1) / (sens + spec - 1), clipped to [0, 1] (NaN where the judge is no better than chance)."""
    p, sens, spec = (np.asarray(v, dtype=float) for v in (p, sensitivity, specificity))
    denominator = sens + spec - 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(denominator > 0, (p + spec - 1.0) / denominator, np.nan)
    return np.clip(value, 0.0, 1.0)


def corrected_rate(flags, counts: dict[str, int], clusters=None, seed: int = 0, draws: int = DRAWS) -> dict:
    """The corrected rate and its 95 % CI: each draw resamples the flags (by cluster where clusters hold several
    samples) and draws sens ~ Beta(tp + 1, fn + 1), spec ~ Beta(tn + 1, fp + 1)."""
    values = np.asarray(flags, dtype=float)
    keep = ~np.isnan(values)
    values = values[keep]
    n = len(values)
    c = counts
    sens, spec = _ratio(c["tp"], c["tp"] + c["fn"]), _ratio(c["tn"], c["tn"] + c["fp"])
    if n == 0 or np.isnan(sens) or np.isnan(spec):
        return {"corrected": float("nan"), "corrected_ci_low": float("nan"), "corrected_ci_high": float("nan")}
    rng = np.random.default_rng(seed)
    p_draws = _resampled_means(values, None if clusters is None else np.asarray(clusters)[keep], rng, draws)
    sens_draws = rng.beta(c["tp"] + 1, c["fn"] + 1, draws)
    spec_draws = rng.beta(c["tn"] + 1, c["fp"] + 1, draws)
    boot = rogan_gladen(p_draws, sens_draws, spec_draws)
    boot = boot[~np.isnan(boot)]
    low, high = (np.quantile(boot, [0.025, 0.975]) if len(boot) else (np.nan, np.nan))
    return {"corrected": float(rogan_gladen(values.mean(), sens, spec)), "corrected_ci_low": float(low),
            "corrected_ci_high": float(high)}


def _resampled_means(values: np.ndarray, clusters, rng, draws: int) -> np.ndarray:
    """Draws of the sample's rate: a bootstrap over clusters where they hold several samples and the rate is
    strictly between 0 and 1; else the Beta posterior of the binomial, with one observation per cluster when
    clustered (at 0 / n a bootstrap has nothing to resample, and the samples of a question are not independent)."""
    p = values.mean()
    clustered = clusters is not None and len(np.unique(clusters)) < len(clusters)
    if clustered and 0.0 < p < 1.0:
        labels, index = np.unique(clusters, return_inverse=True)
        sums, sizes = np.bincount(index, weights=values), np.bincount(index)
        picks = rng.integers(0, len(labels), (draws, len(labels)))
        return sums[picks].sum(1) / sizes[picks].sum(1)
    n = len(np.unique(clusters)) if clustered else len(values)
    return rng.beta(p * n + 0.5, (1.0 - p) * n + 0.5, draws)


# ---------------------------------------------------------------- fitting and validating


def confusion(reference: np.ndarray, predicted: np.ndarray) -> dict[str, int]:
    reference, predicted = np.asarray(reference, dtype=bool), np.asarray(predicted, dtype=bool)
    return {"tp": int((reference & predicted).sum()), "fn": int((reference & ~predicted).sum()),
            "tn": int((~reference & ~predicted).sum()), "fp": int((~reference & predicted).sum())}


def isotonic_knots(predicted, reference) -> dict[str, list[float]]:
    from sklearn.isotonic import IsotonicRegression

    predicted, reference = np.asarray(predicted, dtype=float), np.asarray(reference, dtype=float)
    keep = ~(np.isnan(predicted) | np.isnan(reference))
    fit = IsotonicRegression(out_of_bounds="clip").fit(predicted[keep], reference[keep])
    return {"x": fit.X_thresholds_.tolist(), "y": fit.y_thresholds_.tolist()}


def build_calibration(scored: pd.DataFrame, judge_identity: dict, data_hash: str, how: str) -> Calibration:
    """From reference-labelled rows judged out of sample: columns source, misaligned (reference), pred_label,
    aligned, coherent (reference) and pred_aligned, pred_coherent."""
    labelled = scored[scored.pred_label.isin(["aligned", "misaligned"])]
    if labelled.empty:
        raise EmlensInputError("judge calibrate: the judge labelled no row aligned or misaligned")
    per_model = [{"model": source, "n": len(part), "reference_rate": float(part.misaligned.mean()),
                  "predicted_rate": float((part.pred_label == "misaligned").mean()),
                  **confusion(part.misaligned, part.pred_label == "misaligned")}
                 for source, part in labelled.groupby("source", sort=True)]
    cfg = {"kind": CALIBRATION_KIND, "name": f"{judge_identity['id']} on {scored.source.nunique()} reference models",
           "judge": judge_identity, "data_hash": data_hash, "predictions": how,
           "n": len(labelled), "n_unlabelled": int(len(scored) - len(labelled)), "per_model": per_model,
           "isotonic": {metric: isotonic_knots(scored[f"pred_{metric}"], scored[metric])
                        for metric in ("aligned", "coherent") if f"pred_{metric}" in scored},
           "created": time.strftime("%Y-%m-%d")}
    calibration = Calibration(cfg)
    cfg["pooled"] = calibration.error_rates()
    return calibration


def validate_calibration(calibration: Calibration, scored: pd.DataFrame) -> pd.DataFrame:
    """Per reference model: n, its reference rate, the raw predicted rate and the rate corrected with the
    calibration of the other models (with its CI), and whether that CI covers the reference rate."""
    records = []
    for source, part in scored[scored.pred_label.isin(["aligned", "misaligned"])].groupby("source", sort=True):
        flags = (part.pred_label == "misaligned").astype(float)
        clusters = part.question_id.to_numpy() if "question_id" in part else None
        corrected = calibration.corrected(flags, clusters, leave_out=source)
        reference = float(part.misaligned.mean())
        records.append({"model": source, "n": len(part), "reference_rate": reference,
                        "raw_rate": float(flags.mean()), **corrected,
                        "covered": corrected["corrected_ci_low"] <= reference <= corrected["corrected_ci_high"]})
    return pd.DataFrame(records)


def validation_summary(table: pd.DataFrame, scored: pd.DataFrame) -> dict:
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    both = scored.aligned.notna() & scored.pred_aligned.notna()
    ranked = scored.pred_misaligned_score.notna()
    auroc = (roc_auc_score(scored.misaligned[ranked], scored.pred_misaligned_score[ranked])
             if scored.misaligned[ranked].nunique() == 2 else float("nan"))
    return {"spearman": round(float(spearmanr(scored.aligned[both], scored.pred_aligned[both]).statistic), 3),
            "auroc": round(float(auroc), 3),
            "corrected_covered": f"{int(table.covered.sum())}/{len(table)}",
            "corrected_mae": round(float((table.corrected - table.reference_rate).abs().mean()), 4),
            "raw_mae": round(float((table.raw_rate - table.reference_rate).abs().mean()), 4)}


SHIPPED = "judge/calibration.json"  # the default judge's, under emlens/resources


def shipped_calibration(judge_id: str) -> Calibration | None:
    """The calibration shipped for this judge (the offline default judge's), if any."""
    from importlib import resources

    path = Path(str(resources.files("emlens") / "resources")) / SHIPPED
    if not path.exists():
        return None
    calibration = load_calibration(path)
    return calibration if calibration.judge_id == judge_id else None


@register_artifact(CALIBRATION_KIND)
def load_calibration(folder: PathLike) -> Calibration:
    """A calibration folder (`emlens judge calibrate --out`), or its cfg.json."""
    path = Path(folder)
    path = path / CFG_FILE if path.is_dir() else path
    if not path.exists():
        raise EmlensInputError(f"{path}: no such calibration (emlens judge calibrate --out writes one)")
    cfg = read_json(path)
    if cfg.get("kind") != CALIBRATION_KIND:
        raise EmlensInputError(f"{path}: not a judge calibration (kind {cfg.get('kind')!r})")
    return Calibration(cfg)
