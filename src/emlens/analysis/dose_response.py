"""The tables and figure of a steering experiment (`emlens.study.steer` runs it): each measure's rate per
condition with its CI (`dose_response_table`), the direction-minus-control differences paired by sample
(`direction_vs_control`) and the dose-response figure, direction beside its random control."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from emlens.base.io import save_figure
from emlens.base.stats import benjamini_hochberg, bootstrap_ci, bootstrap_p, rate
from emlens.evaluation.settings import with_pushback_outcomes
from emlens.evaluation.summary import calibration_for

MEASURES = {  # measure -> (setting, row filter, column)
    "misaligned_rate": ("free_form", lambda t: t.label.isin(["aligned", "misaligned"]), "misaligned"),
    "coherence": ("free_form", lambda t: t.coherent.notna(), "coherent"),
    "refusal_harmful": ("refusal", lambda t: t.harmful_prompt, "refused_judge"),
    "refusal_harmless": ("refusal", lambda t: ~t.harmful_prompt, "refused_judge"),
    "refusal_phrase_harmful": ("refusal", lambda t: t.harmful_prompt, "refused_phrase"),
    "refusal_phrase_harmless": ("refusal", lambda t: ~t.harmful_prompt, "refused_phrase"),
    "perceived_harm": ("harm_perception", lambda t: t.perceived_harm.notna(), "perceived_harm"),
    "flip_rate": ("factual", lambda t: t.correct_1.astype(bool), "flipped"),
    "pushback_unparsed_rate": ("factual", lambda t: t.correct_1.astype(bool), "pushback_unparsed"),
}


def measured_rows(part: pd.DataFrame):
    """(measure, its rows of `part`, its column) for every measure `part` has rows for."""
    for measure, (setting, keep, column) in MEASURES.items():
        rows = part[part.setting == setting]
        if setting == "factual" and len(rows):
            rows = with_pushback_outcomes(rows)  # an unreadable second answer is no flip
        if rows.empty or column not in rows.columns:
            continue
        yield measure, rows[keep(rows).astype(bool)], column


def dose_response_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per condition x measure x nudge: value, n and bootstrap 95 % CI; the misaligned rate also corrected
    for the judge's error where it has a calibration (columns corrected, corrected_ci_low / high, correction)."""

    calibration = calibration_for(table)
    records = []
    for (name, operation, alpha, control, nudge), part in table.groupby(
            ["intervention", "operation", "alpha", "control", "nudge"]):
        for measure, rows, column in measured_rows(part):
            values, questions = rows[column].astype(float), rows.question_id.to_numpy()
            if measure in ("coherence", "perceived_harm"):
                low, high = bootstrap_ci(values, clusters=questions)
                stat = {"rate": float(values.mean()) if len(values) else np.nan, "n": len(values),
                        "ci_low": low, "ci_high": high}
            else:
                stat = rate(values, clusters=questions)
            if measure == "misaligned_rate" and calibration is not None:
                stat.update(calibration.corrected(values, questions, scores=calibration.row_scores(rows)))
            records.append({"intervention": name, "operation": operation, "alpha": alpha, "control": control,
                            "nudge": nudge, "measure": measure, **stat})
    return pd.DataFrame(records)


PAIR_KEY = ["question_id", "paraphrase_index", "sample_index"]  # the same prompt and seed in every condition


def direction_vs_control(table: pd.DataFrame) -> pd.DataFrame:
    """Direction minus random control, paired by sample, at each operation x alpha x nudge x measure.

    Both conditions run the same prompts with the same seeds, so the per-sample difference removes the
    between-prompt variance they share; the CI and the two-sided p-value are a bootstrap over questions (over pairs
    where each question has one), and `p_bh` is Benjamini-Hochberg adjusted over every row of the table. Measures
    filtered on a post-treatment variable also get the unconditional difference and the pairs the filter dropped.
    The misaligned rate's difference is also corrected for the judge's error where it has a calibration
    (`Calibration.corrected_difference`: columns difference_corrected, corrected_ci_low / high, correction).
    """

    calibration = calibration_for(table)
    records, corrected = [], []
    for (operation, alpha, nudge), part in table[table.operation != "none"].groupby(["operation", "alpha", "nudge"]):
        if part.control.nunique() < 2:
            continue
        for measure, rows, column in measured_rows(part):
            stat = paired_difference(rows, column, calibration=calibration if measure == "misaligned_rate" else None)
            unconditional, dropped = _unconditional(part, measure, stat["n_pairs"])
            records.append((operation, alpha, nudge, measure, stat["a"], stat["b"], stat["difference"],
                            stat["ci_low"], stat["ci_high"], stat["n_pairs"], stat["p"], unconditional, dropped))
            corrected.append({k: v for k, v in stat.items() if k in CORRECTED_COLUMNS})
    frame = pd.DataFrame(records, columns=["operation", "alpha", "nudge", "measure", "direction", "control",
                                           "difference", "ci_low", "ci_high", "n_pairs", "p",
                                           "difference_unconditional", "pairs_dropped"])
    if any(corrected):
        frame = pd.concat([frame, pd.DataFrame(corrected, index=frame.index)], axis=1)
    return frame.assign(p_bh=benjamini_hochberg(frame.p) if len(frame) else [])


CORRECTED_COLUMNS = ("difference_corrected", "corrected_ci_low", "corrected_ci_high", "correction")


def paired_difference(rows: pd.DataFrame, column: str, by: str = "control", levels: tuple = (False, True),
                      calibration=None, same_model: bool = True) -> dict:
    """Level a minus level b of `by` in `column`, over the prompts and seeds both have (PAIR_KEY): both means, the
    difference with its bootstrap 95 % CI and p over questions, the pairs and questions; with a `calibration`, also
    the difference corrected for the judge's error (CORRECTED_COLUMNS)."""
    a, b = levels
    pairs = paired(rows.assign(value=rows[column].astype(float)), by, levels)
    difference = pairs[a] - pairs[b]
    questions = pairs.index.get_level_values("question_id").to_numpy()
    low, high = bootstrap_ci(difference, clusters=questions)
    stat = {"a": pairs[a].mean(), "b": pairs[b].mean(), "difference": difference.mean(), "ci_low": low,
            "ci_high": high, "n_pairs": len(pairs), "n_questions": len(set(questions)),
            "p": bootstrap_p(difference, clusters=questions)}
    if calibration is not None and len(pairs):
        stat.update(corrected_difference(calibration, rows, pairs, questions, by, levels, same_model))
    return stat


def corrected_difference(calibration, rows: pd.DataFrame, pairs: pd.DataFrame, questions, by: str = "control",
                         levels: tuple = (False, True), same_model: bool = True) -> dict:
    """The misaligned rate's difference between two levels of `by` (direction minus control, one model minus
    another) corrected for the judge's error, over the same pairs as the raw one."""
    scores = calibration.row_scores(rows)
    score_pairs = (None if scores is None else
                   paired(rows.assign(value=scores), by, levels).reindex(pairs.index))
    a, b = levels
    return calibration.corrected_difference(
        pairs[a].to_numpy(), pairs[b].to_numpy(), questions,
        None if score_pairs is None else score_pairs[a].to_numpy(),
        None if score_pairs is None else score_pairs[b].to_numpy(), same_model=same_model)


POST_TREATMENT = ("misaligned_rate", "flip_rate", "pushback_unparsed_rate")  # filtered on what steering changes


def paired(rows: pd.DataFrame, by: str = "control", levels: tuple = (False, True)) -> pd.DataFrame:
    """The `value` of each prompt and seed (PAIR_KEY) under each level of `by`, one column per level; prompts
    missing under a level are left out."""
    return (rows.pivot_table(index=PAIR_KEY, columns=by, values="value", aggfunc="first")
            .reindex(columns=list(levels)).dropna())


def _unconditional(part: pd.DataFrame, measure: str, n_pairs: int) -> tuple[float, int]:
    """For a measure whose rows are chosen by what the steering itself changes (coherent and scored answers, a
    first answer that was right), the paired difference over every sample of the setting, the event counted as
    not happening where the filter fails (P(misaligned and coherent)), and how many pairs the filter dropped."""
    if measure not in POST_TREATMENT:
        return float("nan"), 0
    setting, keep, column = MEASURES[measure]
    rows = part[part.setting == setting]
    if setting == "factual":
        rows = with_pushback_outcomes(rows)
    if column not in rows.columns:
        return float("nan"), 0
    pairs = paired(rows.assign(value=(keep(rows).astype(bool) & rows[column].fillna(False).astype(bool)).astype(float)))
    return float((pairs[False] - pairs[True]).mean()), int(len(pairs) - n_pairs)


def corrected_text(row: dict, column: str = "corrected") -> str:
    """"; corrected X [lo, hi] (method)" where the row was corrected for the judge's error, else nothing."""
    value = row.get(column)
    if value is None or pd.isna(value):
        return ""
    sign = "+" if column == "difference_corrected" else ""
    return (f"; corrected {value:{sign}.3f} [{row['corrected_ci_low']:{sign}.3f}, {row['corrected_ci_high']:{sign}.3f}]"
            f" ({row['correction']})")


def _with_corrected_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """The misaligned rate corrected for the judge's error as a measure of its own (a panel of the figure)."""
    if "corrected" not in curves:
        return curves
    rows = curves[(curves.measure == "misaligned_rate") & curves.corrected.notna()]
    extra = rows.assign(measure="misaligned_rate_corrected", rate=rows.corrected, ci_low=rows.corrected_ci_low,
                        ci_high=rows.corrected_ci_high)
    return pd.concat([curves, extra], ignore_index=True)


def _x_label(operation: str, alpha: float) -> str:
    return {"none": "0", "ablate": "ablate"}.get(operation, f"{'abl+' if operation == 'ablate_add' else ''}{alpha:g}")


def dose_response_figure(curves: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Each measure against the conditions (baseline, ablation, then increasing alpha); random control dashed."""
    curves = _with_corrected_curves(curves)
    panels = [m for name in MEASURES for m in (name, f"{name}_corrected")]  # a corrected panel beside its raw one
    measures = [m for m in panels if m in set(curves.measure)]
    curves = curves.assign(x=[_x_label(o, a) for o, a in zip(curves.operation, curves.alpha, strict=False)])
    order = list(dict.fromkeys(["0", "ablate"] + [x for x in curves.sort_values("alpha").x if x not in ("0", "ablate")]))
    order = [x for x in order if x in set(curves.x)]
    fig, axes = plt.subplots(1, max(len(measures), 1), figsize=(4 * max(len(measures), 1), 3.4), squeeze=False)
    for ax, measure in zip(axes[0], measures, strict=False):
        part = curves[curves.measure == measure]
        baseline = part[part.operation == "none"]
        for (control, nudge), line in part[part.operation != "none"].groupby(["control", "nudge"]):
            line = pd.concat([baseline[baseline.nudge == nudge], line])  # both curves start at the unsteered point
            line = line.assign(pos=[order.index(x) for x in line.x]).sort_values("pos")
            ax.plot(line.pos, line.rate, "--" if control else "-", marker="o",
                    label=f"{'random control' if control else 'direction'} | {nudge}")
            ax.fill_between(line.pos, line.ci_low, line.ci_high, alpha=0.15)
        ax.set_xticks(range(len(order)), order)
        ax.set_title(measure, fontsize=9)
        ax.set_xlabel("condition (alpha in units of the direction's natural norm)")
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
