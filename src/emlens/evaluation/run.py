"""`emlens eval` and `em.evaluate`: run the configured settings under nudges (resumable), judge the rows,
and write one tidy table per run."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd

from emlens.base.io import atomic_write_json, content_hash, validate
from emlens.data.nudges import resolve_nudges
from emlens.evaluation.config import EvalConfig
from emlens.evaluation.judging import TEMPLATES_FILE, judge_table
from emlens.evaluation.settings import RUNNERS
from emlens.generation.engine import resolve_engine
from emlens.generation.sampling import SAMPLE_KEY
from emlens.judges import make_judge
from emlens.judges.base import Judge
from emlens.model import Model
from emlens.runs import RunStore

# bump when a change alters what an eval run holds: `emlens run` then redoes finished stages
RESULTS_VERSION = 3  # 2: issue 24's fixes (judge verdicts, rating floor, pushback, CIs, ablation); 3: response steering from the last prompt token

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- running


def run_eval(handle: Model, config: EvalConfig, out: str | Path, judge: Judge | None = None,
             interventions=(), intervention_name: str = "none", progress: bool = True,
             extra_manifest: dict | None = None) -> pd.DataFrame:
    """Run every configured setting (resumable), judge the rows, and write RUN/samples.parquet."""
    nudges = resolve_nudges(config.nudges, config.nudges_file)
    if judge is None:  # before any sampling: a judge that cannot run fails here, not after the generation
        judge = make_judge(config.judge, config.judge_model, **config.judge_options())
    interventions = list(interventions)  # auto takes vLLM only where it can apply every one
    config = config.model_copy(update={"engine": resolve_engine(handle, config.engine, interventions)})  # as it ran
    store = RunStore(out, SAMPLE_KEY)
    store.open({"kind": "eval_run", "model": handle.describe(),
                "config": {**config.identity(), "intervention": intervention_name,
                           **(extra_manifest or {})}}, results_version=RESULTS_VERSION)
    templates: dict[str, dict[str, str]] = {}
    for setting in config.settings:
        log.info("setting %s", setting)
        questions = RUNNERS[setting](handle, config, nudges, store, interventions, intervention_name, progress)
        templates.update({q.id: q.judge_prompts for q in questions or []})
    atomic_write_json(Path(out) / TEMPLATES_FILE, templates)  # `emlens judge export / compare` judge the run again
    table = judge_table(store.read_parts(), judge, templates)
    return store.finish({"judge": judge.id, "judge_identity": {**judge.identity(),
                                                                "prompts_sha256": content_hash(templates)}},
                        table=table)


def evaluate(model: Model, settings: list[str] | None = None, interventions=(), out: str | Path | None = None,
             config: EvalConfig | None = None, judge: Judge | str | None = None, progress: bool = False,
             **fields) -> pd.DataFrame:
    """`em.evaluate`: the eval settings under nudges, judged, as one table (see EvalConfig for `fields`).

    With `out` the run folder is kept and a re-run resumes it; without, the run lives in a temporary folder.
    `interventions` (e.g. `direction.ablate()`) are attached for the whole run and named in the table.
    """
    base = (config or EvalConfig()).model_dump()
    config = validate(EvalConfig, {**base, **fields, **({"settings": settings} if settings else {})}, "evaluate()")
    if isinstance(judge, str):
        judge = make_judge(judge, config.judge_model, **config.judge_options())
    interventions = list(interventions)
    name = "+".join(getattr(i, "name", type(i).__name__) for i in interventions) or "none"
    if out is not None:
        return run_eval(model, config, out, judge, interventions, name, progress)
    with tempfile.TemporaryDirectory(prefix="emlens-eval-") as tmp:
        return run_eval(model, config, Path(tmp) / "run", judge, interventions, name, progress)
