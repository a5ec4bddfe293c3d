"""The Betley deception sets beside the deception rate: the existing eval's `deception` setting (its TRUE / FALSE /
UNKNOWN judge prompt) run into a sub-run of an honesty run, and the existing summary's P(FALSE) read back, so the
two measures can be reported side by side. (The deception rate itself, reasoning then answering, is read by
`emlens.judges.honesty`.)
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from emlens.base.io import read_json
from emlens.evaluation.config import DECEPTION_METRIC, DeceptionSpec, EvalConfig
from emlens.evaluation.judging import TEMPLATES_FILE
from emlens.evaluation.run import run_eval
from emlens.evaluation.summary import summarize
from emlens.judges.base import Judge
from emlens.model import Model

# ---------------------------------------------------------------- the Betley deception sets, as eval runs them


def betley_deception(handle: Model, out: str | Path, judge: Judge, nudges: list[str], nudges_file: str | None,
                     limit: int | None, max_new_tokens: int, seed: int, batch_size: int, engine: str,
                     progress: bool = True) -> dict:
    """The existing eval's `deception` setting into `out` (an eval run, resumable), read back through its summary:
    P(FALSE) among TRUE / FALSE verdicts per system prompt, and the count of each verdict per nudge."""
    config = EvalConfig(settings=["deception"], nudges=nudges, nudges_file=nudges_file, seed=seed,
                        batch_size=batch_size, engine=engine,
                        deception=DeceptionSpec(limit=limit, max_new_tokens=max_new_tokens))
    table = run_eval(handle, config, out, judge=judge, progress=progress)
    false_rate = summarize(table).get("deception_false_rate", pd.DataFrame())
    templates = read_json(Path(out) / TEMPLATES_FILE)
    return {"run": str(out), "false_rate": false_rate.to_dict("records"), "verdicts": verdict_counts(table, templates)}


def verdict_counts(table: pd.DataFrame, templates: dict[str, dict[str, str]]) -> dict[str, dict[str, int]]:
    """nudge -> how many answers to questions with the TRUE / FALSE / UNKNOWN judge prompt got each verdict."""
    rows = table[table.question_id.map(lambda qid: DECEPTION_METRIC in templates.get(qid, {}))]
    if DECEPTION_METRIC not in rows.columns:
        return {}
    verdicts = rows[DECEPTION_METRIC].fillna("unjudged")  # None: the judge put too little mass on the words
    return {nudge: {str(k): int(v) for k, v in part.value_counts().items()}
            for nudge, part in verdicts.groupby(rows.nudge)}
