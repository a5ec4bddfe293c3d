"""A battery of measures on a list of models (a base model and its adapters): honesty under pressure, free-form EM
and capability, a plan of model x measure stages run by the one runner (study/runner.py), each into its own
resumable run folder OUT/<model>/<measure>/, read back as one table of rates
with n and 95 % CIs, and drawn against a swept quantity. The mixture study (rates against the misaligned ratio)
and the interaction loop (before and after self-training) measure their adapters with it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import matplotlib.pyplot as plt
import pandas as pd
from pydantic import BaseModel, Field, model_validator

from emlens.base.config import Config
from emlens.base.io import atomic_write_json, deep_merge, finished, read_json, save_figure
from emlens.evaluation.capability_tasks import CapabilityConfig
from emlens.evaluation.config import EvalConfig, FreeFormSpec
from emlens.evaluation.honesty import JUDGING_FIELDS, HonestyConfig
from emlens.evaluation.measures import MEASURES, RATE_COLUMNS, capability_rates, free_form_rates, honesty_rates
from emlens.evaluation.preflight import JudgeSpec, eval_judges, honesty_judges
from emlens.evaluation.settings import sample_count
from emlens.model import folder_fingerprint, resolve_adapter
from emlens.runs import check_same_identity, recorded_settings
from emlens.study.runner import Judges, Models, Stage, run_measure, run_stages

Measure = Literal["honesty", "free_form", "capability"]
SECTIONS = ("honesty", "free_form", "capability")
UNRECORDED = {"honesty": JUDGING_FIELDS, "free_form": set(), "capability": set()}  # in cfg.json beside `config`
SUBJECT_FILE = "subject.json"  # which adapter (and its fingerprint) a subject's folder measured
# (measure, panel title) of the figures, in order; a table without a measure leaves its panel out
PANELS = (("honesty", "honesty = 1 - P(lie)"), ("em_rate", "free-form P(misaligned) among coherent"),
          ("em_rate_corrected", "P(misaligned), corrected for the judge's error"),
          ("mc_accuracy", "MC accuracy (option log-likelihood)"), ("gsm8k_exact_match", "GSM8K exact match"))


class BatteryConfig(Config):
    """Which measures, and each one's own config (small CPU defaults: one nudge, no reasoning pass, 8 free-form
    questions x 4 samples, 100 MC questions and 20 GSM8K problems)."""

    measures: list[Measure] = Field(["honesty", "free_form", "capability"], min_length=1)
    honesty: HonestyConfig = HonestyConfig(nudges=["none"], deception=False)
    free_form: EvalConfig = EvalConfig(settings=["free_form"], nudges=["none"], free_form=FreeFormSpec(samples=4))
    capability: CapabilityConfig = CapabilityConfig()

    @model_validator(mode="before")
    @classmethod
    def _sections_over_the_battery_defaults(cls, data: Any) -> Any:
        """A section given as a mapping keeps the battery's defaults it does not name (not its own class's)."""
        if isinstance(data, dict):
            data = {name: deep_merge(cls.model_fields[name].default.model_dump(), value)
                    if name in SECTIONS and isinstance(value, dict) else value for name, value in data.items()}
        return data


@dataclass
class Subject:
    name: str  # its folder under OUT, e.g. "base" or "ratio-5pct"
    adapter: str | None  # None: the base model


def measure_subjects(model: str, subjects: list[Subject], config: BatteryConfig, out: str | Path,
                     device: str = "auto", progress: bool = True,
                     echo: Callable[[str], None] = lambda _: None) -> list[dict]:
    """Every measure of every subject into OUT/<subject>/<measure>/, as stages of the one runner: a re-run loads a
    model only when one of its measures is not done, and each measure's run folder resumes what it had done.
    Returns the runner's record per stage."""
    out = Path(out)
    for subject in subjects:  # every refusal before any model loads
        check_same_subject(out / subject.name, subject)
        for measure in config.measures:
            check_same_settings(out / subject.name / measure, getattr(config, measure), UNRECORDED[measure])
    adapters = {subject.name: subject.adapter for subject in subjects}
    models, judges = Models(lambda stage: (model, adapters[stage.model]), device), Judges()
    return run_stages(battery_plan(subjects, config, out), out,
                      lambda stage, folder: run_measure(stage, folder, models, judges, progress), echo)


def battery_plan(subjects: list[Subject], config: BatteryConfig, out: Path) -> list[Stage]:
    """One stage per subject and measure, subject by subject (one model load each): free-form EM is an eval
    stage (the eval's free-form setting), honesty and capability their registered measures."""
    costs = {m: f"{sample_count(config.free_form)} samples" if m == "free_form"
             else MEASURES[m].prepare(getattr(config, m)) for m in config.measures}  # reads and checks their files
    return [Stage("eval" if measure == "free_form" else measure, subject.name,
                  {"config": getattr(config, measure).identity(mode="json"), "adapter": subject.adapter},
                  costs[measure], subject.name, config=getattr(config, measure), at=out / subject.name / measure)
            for subject in subjects for measure in config.measures]


def check_same_subject(folder: Path, subject: Subject) -> None:
    """A subject's folder holds measures of one adapter: a re-run after the adapter changed (retrained) is refused,
    never mixed with the old answers (the one identity rule, `emlens.runs.check_same_identity`)."""
    adapter = str(resolve_adapter(subject.adapter)) if subject.adapter else None
    identity = {"adapter": adapter, "adapter_fingerprint": folder_fingerprint(Path(adapter)) if adapter else None}
    path = folder / SUBJECT_FILE
    if path.is_file():
        recorded = read_json(path)
        check_same_identity(folder, {"model": {"adapter": recorded["adapter"],
                                               "fingerprint": recorded["adapter_fingerprint"]}},
                            {"model": {"adapter": adapter, "fingerprint": identity["adapter_fingerprint"]}})
    else:
        atomic_write_json(path, identity)


def check_same_settings(run: Path, config: BaseModel, unrecorded: set[str]) -> None:
    """A finished measure is reused only when it ran with these settings; one that ran with others (or before a
    setting existed, unless it is None now) is refused, never passed off as measured with the new ones. Settings a
    run does not record (its judge: honesty re-judges the same answers) and an engine left to `auto` (recorded as
    resolved) are not compared."""
    if not finished(run):
        return
    skipped = unrecorded | ({"engine"} if config.engine == "auto" else set())
    wanted = {name: value for name, value in config.identity(mode="json").items() if name not in skipped}
    check_same_identity(run, {"config": recorded_settings(run, "config", wanted)}, {"config": wanted})


# ---------------------------------------------------------------- the table


def battery_table(out: str | Path, subjects: list[Subject], measures: list[str]) -> pd.DataFrame:
    """One row per subject, measure and nudge (columns model, measure, nudge, rate, n, ci_low, ci_high). Measures:
    honesty, honesty_kept_belief, evasion, belief_consistency; em_rate, em_rate_corrected (where the judge has a
    calibration), coherence; mc_accuracy, gsm8k_exact_match, gsm8k_truncated."""
    readers = {"honesty": honesty_rates, "free_form": free_form_rates, "capability": capability_rates}
    rows = [{"model": s.name, **row}
            for s in subjects for measure in measures for row in readers[measure](Path(out) / s.name / measure)]
    return pd.DataFrame(rows, columns=["model", *RATE_COLUMNS])


def report_lines(table: pd.DataFrame) -> list[str]:
    """One line per measure and nudge: each model's rate [95 % CI] (n), in the table's order."""
    lines = []
    for (measure, nudge), part in table.groupby(["measure", "nudge"], sort=False):
        cells = [f"{r['model']} {_fmt(r)}" for r in part.to_dict("records")]
        lines.append(f"{measure} (nudge {nudge}): " + " | ".join(cells))
    return lines


def _fmt(r: dict) -> str:
    if math.isnan(r["rate"]):
        return f"- (n={r['n']})"
    return f"{r['rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] (n={r['n']})"


# ---------------------------------------------------------------- the figure


def battery_figure(table: pd.DataFrame, x: str, x_label: str, path: Path, series: tuple[str, ...] = ("nudge",),
                   x_format: Callable[[float], str] = "{:g}".format, ringed: float | None = None,
                   ringed_label: str = "") -> None:
    """One panel per measure against column `x` (its values evenly spaced): a line with 95 % CIs per value of the
    `series` columns; the base model (x missing) a dashed line in its CI band; the point at x == `ringed` (a
    control) ringed."""
    panels = [(m, title) for m, title in PANELS if m in set(table.measure)]
    width = max(len(panels), 1)
    fig, axes = plt.subplots(1, width, figsize=(4.2 * width, 3.6), squeeze=False)
    xs = sorted(table[x].dropna().unique())
    for ax, (measure, title) in zip(axes[0], panels, strict=False):
        rows = table[table.measure == measure]
        for j, (key, part) in enumerate(rows.groupby(list(series), sort=False, dropna=False)):
            name = ", ".join(f"{column} {k}" for column, k in zip(series, key if isinstance(key, tuple) else (key,),
                                                                   strict=True))  # e.g. "nudge evil"
            _draw_series(ax, part, x, xs, name, f"C{j}", ringed, ringed_label)
        ax.set_xticks(range(len(xs)), [x_format(v) for v in xs])
        ax.set_xlabel(x_label)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _draw_series(ax, part: pd.DataFrame, x: str, xs: list[float], name: str, colour: str, ringed: float | None,
                 ringed_label: str) -> None:
    swept = part.dropna(subset=[x]).sort_values(x)
    if len(swept):
        positions = [xs.index(v) for v in swept[x]]
        ax.errorbar(positions, swept.rate, yerr=[swept.rate - swept.ci_low, swept.ci_high - swept.rate], fmt="o-",
                    color=colour, capsize=3, label=name)
        control = swept[swept[x] == ringed]
        if len(control):
            ax.plot([xs.index(ringed)], control.rate, "o", ms=12, mfc="none", color=colour, label=ringed_label)
    base = part[part[x].isna()]
    if len(base):
        row = base.iloc[0]
        ax.axhline(row.rate, ls="--", color=colour, lw=1, label=f"base model ({name})" if len(swept) else "base model")
        ax.axhspan(row.ci_low, row.ci_high, color=colour, alpha=0.12)


def battery_judges(config: BatteryConfig) -> list[JudgeSpec]:
    """The judges a battery will build (checked before a sweep is trained or measured)."""
    found = honesty_judges(config.honesty) if "honesty" in config.measures else []
    return found + (eval_judges(config.free_form) if "free_form" in config.measures else [])
