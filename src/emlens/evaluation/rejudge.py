"""A finished eval run judged again: batch files out and in (`emlens judge export / import`), and the same table
under several judges side by side (`emlens judge compare`).

Batch files use the OpenAI Batch API layout, one request per line with `custom_id` = the judge cache key, so
the results come back into the same cache a live run fills, and `vllm run-batch` reads the same file for a
local judge model. The judge prompts of the run's question sets are in `RUN/judge_prompts.json`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import cohen_kappa_score

from emlens.base.errors import EmlensInputError
from emlens.base.io import CFG_FILE, atomic_write_json, atomic_write_table, atomic_write_text, read_json
from emlens.base.stats import rate, spearman_ci
from emlens.evaluation.judging import JUDGED_SETTINGS, TEMPLATES_FILE, judge_table
from emlens.judges.base import Judge
from emlens.judges.calibration import Calibration, shipped_calibration
from emlens.judges.openai import OpenAIJudge
from emlens.runs import SAMPLES_FILE, read_samples

BATCH_URL = "/v1/chat/completions"


def require_run(run: str | Path) -> Path:
    """The folder of a finished eval run (its samples table), else one line."""
    run = Path(run)
    if not (run / SAMPLES_FILE).is_file():
        problem = "no such folder" if not run.exists() else f"not an eval run folder (no {SAMPLES_FILE})"
        raise EmlensInputError(f"{run}: {problem}")
    return run


def run_templates(run: Path) -> dict[str, dict[str, str]]:
    """The judge prompts of the run's questions (by question id); a run written before they were saved has none,
    so its questions are judged with the default prompts."""
    path = run / TEMPLATES_FILE
    return read_json(path) if path.exists() else {}


def judged_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[table.setting.isin(JUDGED_SETTINGS) & (table.response.astype(str) != "")]


def planned(run: Path, judge: Judge) -> dict[str, tuple[str, tuple[str, ...] | None]]:
    """Every judgement the run needs from this judge: cache key -> (prompt, choices or None for a 0-100 score)."""
    table, templates = judged_rows(read_samples(run)), run_templates(run)
    plan = {}
    for qid, group in table.groupby("question_id", sort=False):
        for key, prompt, choices in judge.planned_requests(group.paraphrase.tolist(), group.response.tolist(),
                                                           templates.get(str(qid), {})):
            plan[key] = (prompt, choices)
    return plan


def export_requests(run: str | Path, judge: OpenAIJudge, out: str | Path) -> tuple[int, int]:
    """Write the judgements not yet in the cache as an OpenAI Batch API file; returns (written, already cached)."""
    run = Path(run)
    plan = planned(run, judge)
    missing = {key: prompt for key, (prompt, _) in plan.items() if judge.cache is None or not judge.cache.has(key)}
    lines = [json.dumps({"custom_id": key, "method": "POST", "url": BATCH_URL, "body": judge.request_body(prompt)})
             for key, prompt in missing.items()]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    return len(missing), len(plan) - len(missing)


def import_results(run: str | Path, judge: OpenAIJudge, results: str | Path,
                   echo: Callable[[str], None] = print) -> dict:
    """Read a batch result file into the judge cache, line by line (a bad line is reported and skipped; the valid
    ones are kept), then label the run's table if every judgement it needs is now cached."""
    run, results = Path(run), Path(results)
    if judge.cache is None:
        raise EmlensInputError("judge import: the judge has no cache to import into")
    plan = planned(run, judge)
    stored, problems = 0, 0
    for number, line in _lines(results):
        problem = _store_result(judge, plan, line)
        if problem is None:
            stored += 1
        else:
            problems += 1
            echo(f"{results}:{number}: {problem}")
    missing = sum(not judge.cache.has(key) for key in plan)
    if missing == 0:
        relabel(run, judge)
    return {"stored": stored, "problems": problems, "missing": missing, "labelled": missing == 0}


def _lines(path: Path):
    if not path.exists():
        raise EmlensInputError(f"{path}: no such file")
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, 1):
            if text.strip():
                yield number, text


def _store_result(judge: OpenAIJudge, plan: dict, text: str) -> str | None:
    """Cache one batch result line; returns what is wrong with it, or None."""
    try:
        line = json.loads(text)
    except json.JSONDecodeError as error:
        return f"not JSON ({error.msg})"
    if not isinstance(line, dict):
        return "not a JSON object"
    key = line.get("custom_id")
    if key not in plan:
        return f"custom_id {str(key)[:20]!r} is not a judgement this run needs"
    if line.get("error"):
        return f"the batch reports an error ({str(line['error'])[:80]})"
    response = line.get("response") or {}
    if response.get("status_code") != 200 or not isinstance(response.get("body"), dict):
        return f"status {response.get('status_code')} (no answer)"
    _, choices = plan[key]
    try:
        result = judge.result_from_payload(response["body"], choices)
    except (KeyError, IndexError, TypeError, AttributeError):
        return "the answer has no logprobs" if judge.mode == "logprobs" else "the answer has no message"
    judge.cache.put(key, result)
    return None


def relabel(run: Path, judge: Judge) -> pd.DataFrame:
    """Judge the run's table again (from the cache where it holds the answers) and rewrite samples.parquet."""
    table = judge_table(read_samples(run), judge, run_templates(run))
    atomic_write_table(table, run / SAMPLES_FILE)
    cfg = read_json(run / CFG_FILE)
    cfg.update({"judge": judge.id, "judge_identity": judge.identity()})
    atomic_write_json(run / CFG_FILE, cfg)
    return table


# ---------------------------------------------------------------- judge agreement


def compare_judges(run: str | Path, judges: dict[str, Judge]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's table scored by each judge: (misaligned rate per judge with n and CI, as the summary counts it;
    per pair, Spearman of `aligned` and Cohen's kappa of the misaligned label over the rows both judged)."""
    run = require_run(run)
    table, templates = read_samples(run), run_templates(run)
    scored = {name: judged_rows(judge_table(table, judge, templates)) for name, judge in judges.items()}
    rates = pd.DataFrame([{"judge": name, **misaligned_rate(frame, shipped_calibration(judges[name].id))}
                          for name, frame in scored.items()])
    pairs = []
    for a, b in itertools.combinations(scored, 2):
        left, right = scored[a], scored[b]
        rho = spearman_ci(left.aligned.astype(float), right.aligned.astype(float))
        labels_a, labels_b = left.misaligned.astype(bool), right.misaligned.astype(bool)
        kappa = (float(cohen_kappa_score(labels_a, labels_b))
                 if labels_a.nunique() + labels_b.nunique() > 2 else float("nan"))  # undefined with one label
        pairs.append({"judge_a": a, "judge_b": b, "spearman_aligned": rho["rho"], "spearman_n": rho["n"],
                      "spearman_ci_low": rho["ci_low"], "spearman_ci_high": rho["ci_high"],
                      "kappa_misaligned": kappa, "n": len(left),
                      "rate_a": float(labels_a.mean()), "rate_b": float(labels_b.mean())})
    return rates, pd.DataFrame(pairs)


def misaligned_rate(judged: pd.DataFrame, calibration: Calibration | None = None) -> dict:
    """P(misaligned) as the summary reads it: free-form answers the judge scored coherent and aligned or
    misaligned (no refusal prompts, no incoherent answers, no CODE / REFUSAL verdicts), CI over questions; with
    the judge's calibration, also corrected for its error."""
    free = judged[(judged.setting == "free_form") & judged.label.isin(["aligned", "misaligned"])]
    found = rate(free.misaligned.astype(float), clusters=free.question_id.to_numpy())
    if calibration is None:
        return {**found, "calibration": ""}
    return {**found, **calibration.corrected(free.misaligned.astype(float), clusters=free.question_id.to_numpy(),
                                           scores=calibration.row_scores(free)),
            "calibration": calibration.cfg.get("name", calibration.judge_id)}


def write_comparison(run: Path, rates: pd.DataFrame, pairs: pd.DataFrame) -> Path:
    """RUN/judge_compare.json: what the report shows beside the run's own judge."""
    path = run / "judge_compare.json"
    atomic_write_json(path, {"rates": _records(rates), "pairs": _records(pairs)})
    return path


def _records(frame: pd.DataFrame) -> list[dict]:
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
            for row in frame.to_dict("records")]

