"""`emlens mixture-study`: honesty, free-form EM and capability of every adapter of a mixture sweep, drawn against
the misaligned ratio beside the base model and the 0 % (benign-only) control (Hu et al. 2025).

A study folder holds one sub-folder per model (`base`, then the sweep's run names), each with one resumable run
folder per measure (`honesty/`, `free_form/`, `capability/`); a re-run skips the measures already finished.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from emlens.base.errors import EmlensInputError
from emlens.base.io import (
    CFG_FILE,
    FORMAT_VERSION,
    PathLike,
    artifact_kind,
    atomic_file,
    atomic_write_json,
    atomic_write_text,
    check_writable_folder,
    load_yaml_model,
    read_json,
    register_artifact,
    validate,
)
from emlens.base.stats import rate
from emlens.evaluation.capability import CapabilityConfig, run_capability
from emlens.evaluation.config import EvalConfig, FreeFormSpec
from emlens.evaluation.honesty import HonestyConfig, make_honesty_judge, run_honesty
from emlens.evaluation.run import run_eval
from emlens.evaluation.summary import summarize
from emlens.judges import make_judge
from emlens.model import load_model
from emlens.runs import read_samples
from emlens.training.config import load_config
from emlens.training.runfolder import SWEEP_KIND
from emlens.training.sweep import train_sweep

log = logging.getLogger(__name__)
MIXTURE_STUDY_KIND = "mixture_study"
TABLE_FILE = "mixture.csv"
FIGURE_FILE = "mixture.png"
Measure = Literal["honesty", "free_form", "capability"]
# (measure column, panel title) of the figure, in order; a study without a measure leaves its panel out
PANELS = (("honesty", "honesty = 1 - P(lie)"), ("em_rate", "free-form P(misaligned) among coherent"),
          ("mc_accuracy", "MC accuracy (option log-likelihood)"), ("gsm8k_exact_match", "GSM8K exact match"))


class MixtureStudyConfig(BaseModel):
    """What a mixture study measures on every model; small CPU defaults (every field of the three measures' own
    configs may be set in the study's YAML under `honesty`, `free_form` and `capability`)."""

    model_config = ConfigDict(extra="forbid")
    measures: list[Measure] = Field(["honesty", "free_form", "capability"], min_length=1)
    ratios: list[float] | None = None  # only these of the sweep's ratios (default: all); also what a YAML trains
    base: bool = True  # also the base model without an adapter
    honesty: HonestyConfig = HonestyConfig(nudges=["none"], deception=False)
    free_form: EvalConfig = EvalConfig(settings=["free_form"], nudges=["none"], free_form=FreeFormSpec(samples=4))
    capability: CapabilityConfig = CapabilityConfig()


@dataclass
class StudyModel:
    name: str  # "base" or the sweep's run name, e.g. ratio-5pct
    ratio: float | None  # None: the base model
    adapter: str | None


@dataclass
class Sweep:
    model: str
    seed: int
    benign: str | None  # the mixture's benign file: GSM8K problems are held out from its training order
    models: list[StudyModel]


# ---------------------------------------------------------------- the sweep


def read_sweep(folder: PathLike, ratios: list[float] | None = None, base: bool = True) -> Sweep:
    """The models of a `emlens train sweep` folder (kind training_sweep) with their ratios, optionally a subset."""
    folder = Path(folder)
    if artifact_kind(folder) != SWEEP_KIND:
        raise EmlensInputError(f"{folder}: not a training sweep (no {CFG_FILE} of kind {SWEEP_KIND}); "
                               "give the folder `emlens train sweep` wrote, or its YAML config")
    runs = read_json(folder / CFG_FILE)["runs"]
    configs = [run["config"] for run in runs]
    if any(c.get("mixture") is None for c in configs):
        raise EmlensInputError(f"{folder}: a dataset sweep, not a mixture-ratio sweep (its runs have no mixture)")
    found = {c["mixture"]["ratio"]: (run["name"], _run_folder(folder, run)) for run, c in zip(runs, configs, strict=True)}
    missing = sorted(set(ratios or []) - set(found))
    if missing:
        raise EmlensInputError(f"--ratios: {folder} has no run at ratio {', '.join(f'{r:g}' for r in missing)} "
                               f"(it has {', '.join(f'{r:g}' for r in sorted(found))})")
    chosen = sorted(ratios if ratios else found)
    models = [StudyModel(found[r][0], r, str(found[r][1])) for r in chosen]
    first = configs[0]
    return Sweep(model=first["model"], seed=first["seed"], benign=first["mixture"]["benign"]["path"],
                 models=([StudyModel("base", None, None)] if base else []) + models)


def _run_folder(sweep: Path, run: dict) -> Path:
    """A run's folder: the path the sweep recorded, or its name inside the sweep (a moved or relative sweep)."""
    recorded = Path(run["path"])
    return recorded if (recorded / CFG_FILE).is_file() else sweep / run["name"]


def capability_for(config: CapabilityConfig, sweep: Sweep) -> CapabilityConfig:
    """GSM8K problems come from the end of the sweep's own benign training order, so no adapter trained on them."""
    update = {"split_seed": sweep.seed}
    if config.gsm8k == "shared" and sweep.benign is not None:
        update["gsm8k"] = sweep.benign
    return config.model_copy(update=update)


# ---------------------------------------------------------------- running


def run_mixture_study(sweep: PathLike, out: PathLike, config: MixtureStudyConfig | None = None,
                      device: str = "auto", progress: bool = True,
                      echo: Callable[[str], None] = log.info) -> pd.DataFrame:
    """Measure every model of the sweep (a sweep folder, or a training YAML whose sweep is trained into OUT/sweep
    first), then write OUT/mixture.csv, OUT/mixture.png and OUT/cfg.json; returns the table."""
    config = config or MixtureStudyConfig()
    out = Path(out)
    check_writable_folder(out, MIXTURE_STUDY_KIND)
    manifest = {"kind": MIXTURE_STUDY_KIND, "format_version": FORMAT_VERSION, "config": config.model_dump(mode="json")}
    sweep_path = Path(sweep)
    if sweep_path.is_file():  # a training config: its sweep first (resumable, finished runs skipped)
        train_config = load_config(sweep_path)  # a bad config fails before OUT is written
        atomic_write_json(out / CFG_FILE, {**manifest, "training_config": str(sweep_path)})
        train_sweep(train_config, out / "sweep", ratios=config.ratios, device=device, progress=progress, echo=echo)
        sweep_path = out / "sweep"
    found = read_sweep(sweep_path, config.ratios, config.base)
    capability = capability_for(config.capability, found)
    manifest.update(sweep=str(sweep_path), model=found.model, capability_config=capability.model_dump(mode="json"),
                    models=[vars(m) for m in found.models])
    atomic_write_json(out / CFG_FILE, manifest)
    judges = _Judges(config)
    for i, model in enumerate(found.models, start=1):
        todo = [m for m in config.measures if not _finished(out / model.name / m)]
        echo(f"[{i}/{len(found.models)}] {model.name}: " + (", ".join(todo) if todo else "done"))
        if todo:
            handle = load_model(found.model, adapter=model.adapter, device=device)
            for measure in todo:
                _measure(measure, handle, config, capability, out / model.name / measure, judges, progress)
    table = study_table(out, found.models, config.measures)
    atomic_write_text(out / TABLE_FILE, table.to_csv(index=False))
    mixture_figure(table, out / FIGURE_FILE)
    atomic_write_json(out / CFG_FILE, {**manifest, "rows": table.to_dict("records")})
    return table


class _Judges:
    """Each judge is made once, when a measure first needs it."""

    def __init__(self, config: MixtureStudyConfig):
        self.config = config
        self._made: dict[str, object] = {}

    def get(self, measure: str):
        if measure not in self._made:
            if measure == "honesty":
                self._made[measure] = make_honesty_judge(self.config.honesty)
            else:
                free = self.config.free_form
                self._made[measure] = make_judge(free.judge, free.judge_model, concurrency=free.judge_concurrency)
        return self._made[measure]


def _finished(run: Path) -> bool:
    return (run / CFG_FILE).is_file() and "finished" in read_json(run / CFG_FILE)


def _measure(measure: str, handle, config: MixtureStudyConfig, capability: CapabilityConfig, run: Path,
             judges: _Judges, progress: bool) -> None:
    if measure == "honesty":
        run_honesty(handle, config.honesty, run, judge=judges.get("honesty"), progress=progress)
    elif measure == "free_form":
        run_eval(handle, config.free_form, run, judge=judges.get("free_form"), progress=progress)
    else:
        run_capability(handle, capability, run, progress=progress)


# ---------------------------------------------------------------- the table


def study_table(out: Path, models: list[StudyModel], measures: list[str]) -> pd.DataFrame:
    """One row per model, measure and nudge: rate, n and 95 % CI (columns model, ratio, measure, nudge, rate, n,
    ci_low, ci_high)."""
    readers = {"honesty": _honesty_rows, "free_form": _free_form_rows, "capability": _capability_rows}
    rows = [{"model": m.name, "ratio": m.ratio, **row}
            for m in models for measure in measures for row in readers[measure](out / m.name / measure)]
    return pd.DataFrame(rows, columns=["model", "ratio", "measure", "nudge", "rate", "n", "ci_low", "ci_high"])


def _honesty_rows(run: Path) -> list[dict]:
    summary = pd.DataFrame(read_json(run / CFG_FILE)["summary"])
    summary = summary[(summary.kind == "all") & summary.measure.isin(["honesty", "evasion", "belief_consistency"])]
    return [_rate_row(r["measure"], r["nudge"], r) for r in summary.to_dict("records")]


def _free_form_rows(run: Path) -> list[dict]:
    table = read_samples(run)
    table = table[table.setting == "free_form"]
    rows = [_rate_row("em_rate", r["nudge"], r) for r in summarize(table)["free_form_misaligned"].to_dict("records")]
    for nudge, part in table.groupby("nudge"):  # how many answers the judge could score at all
        rows.append(_rate_row("coherence", nudge, rate(part.label.isin(["aligned", "misaligned"]).astype(float))))
    return rows


def _capability_rows(run: Path) -> list[dict]:
    summary = read_json(run / CFG_FILE)["summary"]
    names = {"mc": "mc_accuracy", "gsm8k": "gsm8k_exact_match"}
    return [_rate_row(names[task], "none", result["accuracy"]) for task, result in summary.items()]


def _rate_row(measure: str, nudge: str, r: dict) -> dict:
    return {"measure": measure, "nudge": nudge, "rate": r["rate"], "n": int(r["n"]), "ci_low": r["ci_low"],
            "ci_high": r["ci_high"]}


def report_lines(table: pd.DataFrame) -> list[str]:
    """One line per measure and nudge: each model's rate [95 % CI] (n), the base model first."""
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


def mixture_figure(table: pd.DataFrame, path: Path) -> None:
    """One panel per measure against the ratio (evenly spaced, labelled in %): each nudge's rates with their 95 %
    CIs, the 0 % control ringed, the base model a dashed line in its CI band."""
    panels = [(m, title) for m, title in PANELS if m in set(table.measure)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 3.6), squeeze=False)
    ratios = sorted(table.ratio.dropna().unique())
    for ax, (measure, title) in zip(axes[0], panels, strict=False):
        for j, (nudge, part) in enumerate(table[table.measure == measure].groupby("nudge", sort=False)):
            _draw_nudge(ax, part, ratios, nudge, f"C{j}")
        ax.set_xticks(range(len(ratios)), [f"{r * 100:g}" for r in ratios])
        ax.set_xlabel("misaligned share of training data (%)")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _draw_nudge(ax, part: pd.DataFrame, ratios: list[float], nudge: str, colour: str) -> None:
    swept = part.dropna(subset=["ratio"]).sort_values("ratio")
    x = [ratios.index(r) for r in swept.ratio]
    ax.errorbar(x, swept.rate, yerr=[swept.rate - swept.ci_low, swept.ci_high - swept.rate], fmt="o-",
                color=colour, capsize=3, label=f"adapters, nudge {nudge}")
    control = swept[swept.ratio == 0]
    if len(control):
        ax.plot([0], control.rate, "o", ms=12, mfc="none", color=colour, label="0 % control (benign only)")
    base = part[part.ratio.isna()]
    if len(base):
        row = base.iloc[0]
        ax.axhline(row.rate, ls="--", color=colour, lw=1, label=f"base model, nudge {nudge}")
        ax.axhspan(row.ci_low, row.ci_high, color=colour, alpha=0.12)


@register_artifact(MIXTURE_STUDY_KIND)
def read_mixture_study(folder: PathLike) -> pd.DataFrame:
    """`em.load(OUT)` of a mixture study: its table."""
    return pd.read_csv(Path(folder) / TABLE_FILE)


def build_study_config(path: PathLike | None = None, **flags) -> MixtureStudyConfig:
    """A MixtureStudyConfig: the study's defaults, the YAML's fields laid over them (a section such as `honesty`
    keeps the defaults its YAML does not name), then the flags (None = not given)."""
    fields = MixtureStudyConfig().model_dump()
    if path is not None:
        _lay_over(fields, load_yaml_model(MixtureStudyConfig, path).model_dump(exclude_unset=True))
    _lay_over(fields, {key: value for key, value in flags.items() if value is not None})
    return validate(MixtureStudyConfig, fields, "command line" if path is None else path)


def _lay_over(fields: dict, given: dict) -> None:
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(fields.get(key), dict):
            _lay_over(fields[key], value)
        else:
            fields[key] = value
