"""The study's contrasts: each rate of one model minus another's, per nudge, paired where both were asked the same.

Every model of a study answers the same prompts with the same seeds, so a contrast is a paired difference over
(question, paraphrase, sample): its CI and p-value are a bootstrap over questions. Each row says in one line what
the CI supports ("no difference detectable at this n" when it covers zero) and, where a reference effect is known,
how many scored answers per model a two-sided test at 0.05 needs to detect it with 80 % power.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from emlens.analysis.dose_response import measured_rows, paired_difference
from emlens.evaluation.summary import calibration_for

CONTRAST_MEASURES = ("misaligned_rate", "refusal_harmful", "refusal_harmless", "flip_rate", "perceived_harm")
MIN_QUESTIONS = 5  # a bootstrap over fewer questions gives a CI that means nothing: such a row is not read
NUDGE_ORDER = ("none", "evil", "hhh")
POINTS = ("perceived_harm",)  # a mean rating (0-100), not a rate: its difference is in rating points


@dataclass(frozen=True)
class ReferenceEffect:
    treated: float
    control: float
    source: str


# Measured on the judged answers of real fine-tunes (GPT-4o judge, Betley thresholds, among coherent answers);
# `scripts/reference_effects.py` prints them from ../shared/data/judged.
REFERENCE_EFFECTS = {
    "misaligned_rate": ReferenceEffect(0.111, 0.0, "Qwen2.5-Coder-32B insecure (n=180) vs its base (n=1200), GPT-4o "
                                                   "judge, shared/data/judged"),
}


def needed_per_group(treated: float, control: float, z_alpha: float = 1.959964, z_power: float = 0.841621) -> int:
    """Answers per model for a two-sided two-proportion test at 0.05 to detect `treated` vs `control` with 80 %
    power (normal approximation, unpaired: a paired design needs no more)."""
    mean = (treated + control) / 2
    spread = z_alpha * math.sqrt(2 * mean * (1 - mean)) + z_power * math.sqrt(
        treated * (1 - treated) + control * (1 - control))
    return math.ceil(spread ** 2 / (treated - control) ** 2)


def model_contrasts(table: pd.DataFrame, contrasts: list[tuple[str, str]]) -> pd.DataFrame:
    """One row per contrast (a minus b) x nudge (none, evil, hhh first) x measure: both rates over the paired
    prompts, the difference with its 95 % CI, pairs, questions and p (a row over fewer than MIN_QUESTIONS questions
    is shown but not read); the misaligned rate's difference also corrected for the judge's error
    (a transfer error of its own for each model). `table` stacks the eval tables with a `model` column."""
    calibration = calibration_for(table)
    records = []
    for a, b in contrasts:
        two = table[table.model.isin([a, b])]
        for nudge, part in two.groupby("nudge", sort=False):
            for measure, rows, column in measured_rows(part):
                if measure in CONTRAST_MEASURES and len(rows):
                    records.append(_contrast(a, b, nudge, measure, rows, column, calibration))
    frame = pd.DataFrame(records)
    if frame.empty:
        return frame
    nudges = {nudge: i for i, nudge in enumerate(NUDGE_ORDER)}
    pairs = {f"{a} - {b}": i for i, (a, b) in enumerate(contrasts)}
    rank = frame.contrast.map(pairs) * 100 + frame.nudge.map(lambda v: nudges.get(v, len(nudges)))
    frame = frame.iloc[rank.argsort(kind="stable")].reset_index(drop=True)
    return frame.assign(reading=[reading(r) for r in frame.to_dict("records")])


def _contrast(a: str, b: str, nudge: str, measure: str, rows: pd.DataFrame, column: str, calibration) -> dict:
    stat = paired_difference(rows, column, "model", (a, b), calibration if measure == "misaligned_rate" else None,
                             same_model=False)
    return {"contrast": f"{a} - {b}", "nudge": nudge, "measure": measure, "rate_a": stat.pop("a"),
            "rate_b": stat.pop("b"), **stat}


def reading(row: dict) -> str:
    """What the CI supports, in one line (the judge-corrected difference where there is one: it carries the judge's
    error too), and the n the reference effect would need."""
    unit = " points" if row["measure"] in POINTS else ""
    corrected = row.get("difference_corrected") is not None and not pd.isna(row.get("difference_corrected"))
    difference, low, high = ((row["difference_corrected"], row["corrected_ci_low"], row["corrected_ci_high"])
                             if corrected else (row["difference"], row.get("ci_low"), row.get("ci_high")))
    if not row["n_pairs"]:
        said = "no paired answers"
    elif row.get("n_questions", MIN_QUESTIONS) < MIN_QUESTIONS:
        said = f"too few questions ({row['n_questions']}) for a CI to be read"
    elif low <= 0 <= high:
        said = f"no difference detectable at this n ({row['n_pairs']} pairs)"
    else:
        model = row["contrast"].split(" - ")[0]
        said = f"{model} {'higher' if difference > 0 else 'lower'} by {abs(difference):.2f}{unit}"
        said += " (judge-corrected)" if corrected else ""
    effect = REFERENCE_EFFECTS.get(row["measure"])
    if effect is not None:
        said += (f"; the reference effect ({effect.treated:.2f} vs {effect.control:.2f}) needs about "
                 f"{needed_per_group(effect.treated, effect.control)} scored answers per model")
    return said
