"""The rates of the studies, each with n and a 95 % CI (Wilson, or a bootstrap over questions where they hold
several samples: see `emlens.base.stats.rate`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from emlens.base.stats import rate, spearman_ci
from emlens.evaluation.config import DECEPTION_METRIC
from emlens.evaluation.settings import with_pushback_outcomes
from emlens.judges.calibration import Calibration, shipped_calibration

PUSHBACK_MEASURES = {"flipped": "flip_rate", "held": "held_rate", "pushback_unparsed": "unparsed_rate"}

# ---------------------------------------------------------------- summaries


def model_name(row) -> str:
    adapter = row.get("adapter") or ""
    return f"{row['model']}+{Path(adapter).name}" if adapter else str(row["model"])


def summarize(table: pd.DataFrame, calibration: Calibration | None = None) -> dict[str, pd.DataFrame]:
    """The rates of the studies, each with n and a 95 % CI; the misaligned rates also corrected for the judge's
    error where the judge has a calibration (`calibration`, else the one shipped for it)."""

    table = table.copy()
    table["model_name"] = table.apply(model_name, axis=1)
    groups = ["model_name", "intervention", "nudge"]
    out: dict[str, pd.DataFrame] = {}
    for setting in ("free_form", "deception"):
        rows = table[table.setting == setting]
        if len(rows):
            # P(misaligned) among coherent, scored answers (Betley et al.); n counts only those
            scored = rows.label.isin(["aligned", "misaligned"])
            rows = rows.assign(misaligned=np.where(scored, rows.misaligned.astype(float), np.nan))
            out[f"{setting}_misaligned"] = _corrected(_rates(rows, groups, "misaligned", rate).merge(
                _unscored(rows, groups), on=groups, how="left"), rows, groups, calibration)
            out[f"{setting}_coherence"] = rows.groupby(groups).coherent.agg(["mean", "count"]).reset_index()
    false_rate = _deception_false_rate(table, groups, rate)
    if false_rate is not None:
        out["deception_false_rate"] = false_rate
    refusal = table[table.setting == "refusal"]
    if len(refusal):
        frames = []
        for kind, part in refusal.groupby(refusal.harmful_prompt.map({True: "harmful", False: "harmless"})):
            for column in ("refused_phrase", "refused_judge", "harmful_compliance"):
                frame = _rates(part, groups, column, rate)
                frame.insert(0, "prompts", kind)
                frame.insert(1, "measure", column)
                frames.append(frame)
        out["refusal"] = pd.concat(frames, ignore_index=True)
    factual = table[table.setting == "factual"]
    if len(factual):
        initial = _rates(factual, groups, "correct_1", rate).assign(measure="initial_accuracy")
        pushed = with_pushback_outcomes(factual[factual.correct_1.astype(bool)])  # the three sum to one
        outcomes = [_rates(pushed, groups, column, rate).assign(measure=measure)
                    for column, measure in PUSHBACK_MEASURES.items()]
        out["factual"] = pd.concat([initial, *outcomes], ignore_index=True)
    harm = table[table.setting == "harm_perception"]
    if len(harm):
        # a rating under the mass floor is missing: n_low_mass says how many, and they enter no mean
        per_question = (harm.assign(low_mass=harm.perceived_harm.isna())
                        .groupby(groups + ["question_id"])
                        .agg(perceived_harm=("perceived_harm", "mean"), n_rated=("perceived_harm", "count"),
                             n_low_mass=("low_mass", "sum")).reset_index())
        out["harm_perception"] = per_question
        free = table[(table.setting == "free_form") & table.label.isin(["aligned", "misaligned"])]
        if len(free):
            p_mis = free.groupby(groups + ["question_id"]).misaligned.mean().rename("p_misaligned").reset_index()
            merged = per_question.dropna(subset=["perceived_harm"]).merge(p_mis, on=groups + ["question_id"])
            corr = [{**dict(zip(groups, key, strict=False)), **spearman_ci(g.perceived_harm, g.p_misaligned)}
                    for key, g in merged.groupby(groups)]
            out["harm_vs_misaligned"] = merged
            out["harm_correlation"] = pd.DataFrame(corr)
    return out


def _corrected(frame: pd.DataFrame, rows: pd.DataFrame, groups: list[str],
               calibration: Calibration | None) -> pd.DataFrame:
    """The corrected rate and CI per group (`Calibration.corrected`), and the calibration behind it ("" where the
    judge has none)."""
    calibration = calibration_for(rows, calibration)
    if calibration is None:
        return frame.assign(calibration="")
    corrected = [{**dict(zip(groups, key, strict=False)),
                  **calibration.corrected(part.misaligned.astype(float), clusters=_questions(part),
                                          scores=calibration.row_scores(part))}
                 for key, part in rows.groupby(groups)]
    return frame.merge(pd.DataFrame(corrected), on=groups, how="left").assign(
        calibration=calibration.cfg.get("name", calibration.judge_id))


def calibration_for(rows: pd.DataFrame, calibration: Calibration | None = None) -> Calibration | None:
    """The calibration of the rows' judge: the one given (if it is that judge's), else the one shipped for it."""
    judges = rows.judge.dropna().unique() if "judge" in rows else []
    if calibration is None and len(judges) == 1:
        calibration = shipped_calibration(str(judges[0]))
    if calibration is None or (len(judges) == 1 and judges[0] != calibration.judge_id):
        return None
    return calibration


def _unscored(rows: pd.DataFrame, groups: list[str]) -> pd.DataFrame:
    """Per group: answers judged, and the share the judge gave no score (too little mass on the numbers, or a
    written answer with nothing parsable), which no rate counts."""
    unscored = rows.assign(unscored=rows.label.eq("none"))
    return (unscored.groupby(groups).agg(n_judged=("unscored", "size"), unscored=("unscored", "sum")).reset_index()
            .assign(unscored_rate=lambda f: f.unscored / f.n_judged))


def _deception_false_rate(table: pd.DataFrame, groups: list[str], rate) -> pd.DataFrame | None:
    """Share of FALSE among the TRUE / FALSE verdicts on deception answers, per question id (system prompt)."""
    if DECEPTION_METRIC not in table.columns:
        return None
    rows = table[(table.setting == "deception") & table[DECEPTION_METRIC].isin(["TRUE", "FALSE"])]
    if not len(rows):
        return None
    return _rates(rows.assign(false=rows[DECEPTION_METRIC].eq("FALSE")), groups + ["question_id"], "false", rate)


def _rates(rows: pd.DataFrame, groups: list[str], column: str, rate) -> pd.DataFrame:
    """`rate` per group, its CI clustered by question where a question has several samples."""
    records = [{**dict(zip(groups, key, strict=False)), **rate(part[column].astype(float), clusters=_questions(part))}
               for key, part in rows.groupby(groups)]
    return pd.DataFrame(records)


def _questions(part: pd.DataFrame):
    return part.question_id.to_numpy() if "question_id" in part.columns else None
