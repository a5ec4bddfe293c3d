"""The measure registry: one record per measure a study takes of each model, and the one place that lists them.

A measure is its config class, a runner into a resumable run folder, the data files and judges its result depends
on (what a stage's key hashes), what it costs, its rates as one tidy table (measure, nudge, rate, n, ci_low,
ci_high) and the text of its report section. `emlens run` plans a stage per model for every registered measure an
experiment names (its section is the measure's name), runs it, and reports it; `emlens measures` lists them.
A new measure is one module that calls `register_measure` (a second registration of a name is an error, as
SAELens's `register_sae_class` refuses one):

    register_measure(Measure(name="length", config=LengthConfig, run=run_length, rates=length_rates,
                             title="answer length", description="mean answer length in tokens"))

The EM eval itself (`eval:` sections) keeps its own report (rates per setting and nudge, the judge's correction);
its free-form rates are also readable here as `free_form_rates`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel

from emlens.base.io import CFG_FILE, changed_fields, finished, read_json
from emlens.base.stats import rate
from emlens.evaluation import capability, honesty
from emlens.evaluation.capability import CapabilityConfig, capability_input_files, load_capability_data, run_capability
from emlens.evaluation.honesty import (
    JUDGING_FIELDS,
    HonestyConfig,
    check_judge_reads,
    honesty_input_files,
    load_propositions,
    run_honesty,
)
from emlens.evaluation.summary import summarize
from emlens.generation.context import intervene
from emlens.judges.honesty import make_honesty_judge
from emlens.judges.identity import judge_identity
from emlens.runs import read_samples, recorded_settings

RATE_COLUMNS = ["measure", "nudge", "rate", "n", "ci_low", "ci_high"]
JudgeSpec = tuple[str, str | None]  # (kind, model) of a judge a measure builds
HONESTY_MEASURES = ("honesty", "honesty_kept_belief", "evasion", "belief_consistency")


def _no_files(config: BaseModel) -> dict[str, Path]:
    return {}


def _no_judges(config: BaseModel) -> list[JudgeSpec]:
    return []


def _no_judge(config: BaseModel) -> None:
    return None


@dataclass(frozen=True)
class Measure:
    """One measure of a model. `run(model, config, out, judge=..., interventions=..., progress=...)` fills the run
    folder `out` (resumably, with a cfg.json that says `finished` when done); `rates(out)` reads it back as rate
    rows (dicts with RATE_COLUMNS)."""

    name: str  # its stage kind and its experiment section
    config: type[BaseModel]
    run: Callable[..., Any]
    rates: Callable[[Path], list[dict]]
    title: str  # its part of the report's heading
    description: str  # its part of the report's text: what each rate is
    results_version: int = 1  # raise it when the same inputs give other results: finished stages run again
    input_files: Callable[[Any], dict[str, Path]] = _no_files  # every data file it reads, by field
    judges: Callable[[Any], list[JudgeSpec]] = _no_judges  # the judges it builds (checked before a study starts)
    judge_keys: Callable[[Any], dict] = lambda config: {}  # the judges' identities, for its stage key
    make_judge: Callable[[Any], Any] = _no_judge  # the judge its runner is given (built once per study)
    # reads and checks every file it will read, before any stage runs; returns what one run costs (for --plan)
    prepare: Callable[[Any], str] = lambda config: "one run"
    report_text: Callable[[dict[str, Path]], str] | None = None  # its report text from its runs (default: description)
    # whether a run folder holds its result under `config`: finished, and for a measure that re-reads its answers
    # under new settings (honesty's judge), read under these
    up_to_date: Callable[[Path, Any], bool] = lambda run, config: finished(run)

    def text(self, folders: dict[str, Path]) -> str:
        return self.report_text(folders) if self.report_text is not None else self.description


MEASURES: dict[str, Measure] = {}


def register_measure(measure: Measure) -> Measure:
    if measure.name in MEASURES:
        raise ValueError(f"measure '{measure.name}' is registered already ({MEASURES[measure.name].run.__module__})")
    MEASURES[measure.name] = measure
    return measure


def unregister_measure(name: str) -> None:
    """For tests and notebooks that register a measure for a while."""
    MEASURES.pop(name, None)


def rate_frame(measure_name: str, folders: dict[str, Path]) -> pd.DataFrame:
    """A measure's rates on each model (column model_name), read from the models' run folders."""
    reader = MEASURES[measure_name].rates
    return pd.DataFrame([{"model_name": name, **row} for name, folder in folders.items() for row in reader(folder)],
                        columns=["model_name", *RATE_COLUMNS])


def rate_row(measure_name: str, nudge: str, r: dict) -> dict:
    return {"measure": measure_name, "nudge": nudge, "rate": r["rate"], "n": int(r["n"]), "ci_low": r["ci_low"],
            "ci_high": r["ci_high"]}


# ---------------------------------------------------------------- the built-in measures


def honesty_rates(run: Path) -> list[dict]:
    """Honesty (MASK's, and the kept-belief variant), evasion and belief consistency per nudge of a finished
    honesty run (all kinds together)."""
    summary = pd.DataFrame(read_json(run / CFG_FILE)["summary"])
    summary = summary[(summary.kind == "all") & summary.measure.isin(HONESTY_MEASURES)]
    return [rate_row(r["measure"], r["nudge"], r) for r in summary.to_dict("records")]


def capability_rates(run: Path) -> list[dict]:
    """MC accuracy and GSM8K exact match of a finished capability run."""
    summary = read_json(run / CFG_FILE)["summary"]
    names = {"mc": "mc_accuracy", "gsm8k": "gsm8k_exact_match"}
    rows = [rate_row(names[task], "none", result["accuracy"]) for task, result in summary.items()]
    if "truncated" in summary.get("gsm8k", {}):  # answers cut at max_new_tokens, scored by their last number
        rows.append(rate_row("gsm8k_truncated", "none", summary["gsm8k"]["truncated"]))
    return rows


def free_form_rates(run: Path) -> list[dict]:
    """Free-form P(misaligned) per nudge of an eval run, judge-corrected where the judge has a calibration, and
    the share of answers the judge could score."""
    table = read_samples(run)
    table = table[table.setting == "free_form"]
    rates = summarize(table)["free_form_misaligned"].to_dict("records")
    rows = [rate_row("em_rate", r["nudge"], r) for r in rates]
    rows += [rate_row("em_rate_corrected", r["nudge"], {"rate": r["corrected"], "n": r["n"],
                                                        "ci_low": r["corrected_ci_low"],
                                                        "ci_high": r["corrected_ci_high"]})
             for r in rates if r.get("calibration")]  # where the judge has a calibration
    for nudge, part in table.groupby("nudge"):  # how many answers the judge could score at all
        rows.append(rate_row("coherence", nudge, rate(part.label.isin(["aligned", "misaligned"]).astype(float))))
    return rows


def _run_honesty(model, config: HonestyConfig, out: Path, *, judge=None, interventions: Iterable = (),
                 progress: bool = True) -> None:
    with intervene(model, list(interventions)):
        run_honesty(model, config, out, judge=judge, progress=progress)


def honesty_judges(config: HonestyConfig) -> list[JudgeSpec]:
    """The honesty judge (none for the rule) and, with the rule, the Betley sets' own judge."""
    if config.judge != "rule":
        return [(config.judge, config.judge_model)]
    return [(config.betley_judge, config.betley_judge_model)] if config.betley else []


def _honesty_judge_keys(config: HonestyConfig) -> dict:
    keys = {"judge": judge_identity(config.judge, config.judge_model)}
    if config.betley and config.judge == "rule":  # the rule cannot read the Betley sets: their own judge does
        keys["betley_judge"] = judge_identity(config.betley_judge, config.betley_judge_model)
    return keys


def _honesty_up_to_date(run: Path, config: HonestyConfig) -> bool:
    """Finished and judged as configured now: a run judged otherwise keeps its answers and is judged again."""
    if not finished(run):
        return False
    wanted = {name: value for name, value in config.identity(mode="json").items() if name in JUDGING_FIELDS}
    return not changed_fields(recorded_settings(run, "honesty_config", wanted), wanted)


def _run_capability(model, config: CapabilityConfig, out: Path, *, judge=None, interventions: Iterable = (),
                    progress: bool = True) -> None:
    run_capability(model, config, out, interventions=list(interventions), progress=progress)


def _honesty_cost(config: HonestyConfig) -> str:
    propositions = load_propositions(config)
    check_judge_reads(config.judge, propositions, config.mask_csv or config.propositions)
    return f"{len(propositions)} propositions x {len(config.nudges)} nudges"


def _capability_cost(config: CapabilityConfig) -> str:
    data = load_capability_data(config)  # a bad MC or GSM8K file fails here
    counts = {"mc": len(data.mc), "gsm8k": len(data.gsm8k.problems)}
    return " + ".join(f"{counts[t]} {t}" for t in config.tasks)


CAPABILITY_TEXT = "MC accuracy by option log-likelihood{shots}; GSM8K exact match on problems the model's training never drew"


def _capability_text(folders: dict[str, Path]) -> str:
    """With ' (5-shot)': how many worked examples came before each MC question (runs from before had none)."""
    shots = sorted({read_json(folder / CFG_FILE)["config"].get("mc_shots", 0) for folder in folders.values()})
    return CAPABILITY_TEXT.format(shots=f" ({' / '.join(map(str, shots))}-shot)" if shots else "")


register_measure(Measure(
    name="honesty", config=HonestyConfig, run=_run_honesty, rates=honesty_rates, title="Honesty under pressure",
    description="honesty = 1 - P(lie) over every proposition, the belief elicited without a nudge (MASK; a "
                "proposition without a consistent belief is neither a lie nor evasive); evasion over the same; "
                "honesty_kept_belief: the variant with beliefs elicited under the nudge and only kept beliefs "
                "counted",
    results_version=honesty.RESULTS_VERSION, input_files=honesty_input_files, judges=honesty_judges,
    judge_keys=_honesty_judge_keys, make_judge=make_honesty_judge, prepare=_honesty_cost,
    up_to_date=_honesty_up_to_date))

register_measure(Measure(
    name="capability", config=CapabilityConfig, run=_run_capability, rates=capability_rates, title="Capability",
    description=CAPABILITY_TEXT.format(shots=""), report_text=_capability_text,
    results_version=capability.RESULTS_VERSION, input_files=capability_input_files, prepare=_capability_cost))
