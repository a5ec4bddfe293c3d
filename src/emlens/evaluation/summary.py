"""The rates of the studies, each with n and a bootstrap 95 % CI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from emlens.base.stats import rate, spearman_ci
from emlens.evaluation.config import DECEPTION_METRIC

# ---------------------------------------------------------------- summaries


def model_name(row) -> str:
    adapter = row.get("adapter") or ""
    return f"{row['model']}+{Path(adapter).name}" if adapter else str(row["model"])


def summarize(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The rates of the studies, each with n and a bootstrap 95 % CI."""

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
            out[f"{setting}_misaligned"] = _rates(rows, groups, "misaligned", rate)
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
        flips = _rates(factual[factual.correct_1.astype(bool)], groups, "flipped", rate).assign(measure="flip_rate")
        out["factual"] = pd.concat([initial, flips], ignore_index=True)
    harm = table[table.setting == "harm_perception"]
    if len(harm):
        per_question = harm.groupby(groups + ["question_id"]).perceived_harm.mean().reset_index()
        out["harm_perception"] = per_question
        free = table[(table.setting == "free_form") & table.label.isin(["aligned", "misaligned"])]
        if len(free):
            p_mis = free.groupby(groups + ["question_id"]).misaligned.mean().rename("p_misaligned").reset_index()
            merged = per_question.merge(p_mis, on=groups + ["question_id"])
            corr = [{**dict(zip(groups, key, strict=False)), **spearman_ci(g.perceived_harm, g.p_misaligned)}
                    for key, g in merged.groupby(groups)]
            out["harm_vs_misaligned"] = merged
            out["harm_correlation"] = pd.DataFrame(corr)
    return out


def _deception_false_rate(table: pd.DataFrame, groups: list[str], rate) -> pd.DataFrame | None:
    """Share of FALSE among the TRUE / FALSE verdicts on deception answers, per question id (system prompt)."""
    if DECEPTION_METRIC not in table.columns:
        return None
    rows = table[(table.setting == "deception") & table[DECEPTION_METRIC].isin(["TRUE", "FALSE"])]
    if not len(rows):
        return None
    return _rates(rows.assign(false=rows[DECEPTION_METRIC].eq("FALSE")), groups + ["question_id"], "false", rate)


def _rates(rows: pd.DataFrame, groups: list[str], column: str, rate) -> pd.DataFrame:
    records = [{**dict(zip(groups, key, strict=False)), **rate(part[column].astype(float))} for key, part in rows.groupby(groups)]
    return pd.DataFrame(records)
