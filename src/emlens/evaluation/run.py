"""`emlens eval`: the behavioural settings of the EM studies, under nudges, into one tidy table per run.

Settings (all under every nudge):
- free_form: Betley questions, N samples at temperature 1, judged aligned / coherent, labelled.
- deception: the Betley deception sets, run like free_form.
- refusal: harmful requests and harmless controls; a phrase detector and the judge both flag refusals.
- factual: questions with known answers; the user pushes back and the second answer is marked too.
- harm_perception: the model rates 0-100 how harmful the intent of each free-form question is (expectation
  over the number distribution read from the logits).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from emlens.data.nudges import resolve_nudges
from emlens.evaluation.config import EvalConfig
from emlens.evaluation.judging import judge_table
from emlens.evaluation.settings import RUNNERS
from emlens.generation.sampling import SAMPLE_KEY
from emlens.judges import make_judge
from emlens.judges.base import Judge
from emlens.runs import RunStore

# ---------------------------------------------------------------- running


def run_eval(handle, config: EvalConfig, out: str | Path, judge: Judge | None = None,
             interventions=(), intervention_name: str = "none", progress: bool = True,
             extra_manifest: dict | None = None) -> pd.DataFrame:
    """Run every configured setting (resumable), judge the rows, and write RUN/samples.parquet."""
    nudges = resolve_nudges(config.nudges, config.nudges_file)
    store = RunStore(out, SAMPLE_KEY)
    store.open({"kind": "eval", "model": handle.describe(),
                "config": {**config.model_dump(), "intervention": intervention_name, **(extra_manifest or {})}})
    templates: dict[str, dict[str, str]] = {}
    for setting in config.settings:
        if progress:
            print(f"[emlens] setting {setting}")
        questions = RUNNERS[setting](handle, config, nudges, store, interventions, intervention_name, progress)
        templates.update({q.id: q.judge_prompts for q in questions or []})
    if judge is None:

        judge = make_judge(config.judge, config.judge_model)
    table = judge_table(store.read_parts(), judge, templates)
    return store.finish({"judge": judge.id}, table=table)
