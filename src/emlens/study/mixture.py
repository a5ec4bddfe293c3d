"""`emlens mixture-study`: honesty, free-form EM and capability of every adapter of a mixture sweep, drawn against
the misaligned ratio beside the base model and the 0 % (benign-only) control (Hu et al. 2025).

A study folder holds one sub-folder per model (`base`, then the sweep's run names), each with one resumable run
folder per measure (`honesty/`, `free_form/`, `capability/`); a re-run skips the measures already finished.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from emlens.base.errors import EmlensInputError
from emlens.base.io import (
    CFG_FILE,
    FORMAT_VERSION,
    PathLike,
    artifact_kind,
    atomic_write_json,
    atomic_write_text,
    check_writable_folder,
    read_json,
    register_artifact,
    write_manifest,
)
from emlens.evaluation.capability import held_out_for
from emlens.study.battery import BatteryConfig, Subject, battery_figure, battery_table, measure_subjects
from emlens.study.sweep import train_sweep
from emlens.training.config import load_config
from emlens.training.data import mixture_counts
from emlens.training.runfolder import SWEEP_KIND

log = logging.getLogger(__name__)
MIXTURE_STUDY_KIND = "mixture_study"
TABLE_FILE = "mixture.csv"
FIGURE_FILE = "mixture.png"


class MixtureStudyConfig(BatteryConfig):
    """The measures of every model (see BatteryConfig: `measures`, and the `honesty`, `free_form` and `capability`
    configs, small CPU defaults) and which models: the sweep's `ratios` and the `base` model."""

    ratios: list[float] | None = None  # only these of the sweep's ratios (default: all); also what a YAML trains
    base: bool = True  # also the base model without an adapter


@dataclass
class StudyModel(Subject):
    ratio: float | None = None  # None: the base model


@dataclass
class Sweep:
    model: str
    seed: int
    benign: str | None  # the mixture's benign file: GSM8K problems are held out from its training order
    models: list[StudyModel]
    benign_drawn: int | None = None  # the most benign examples a chosen run drew from that file


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
    models = [StudyModel(found[r][0], str(found[r][1]), r) for r in chosen]
    first = configs[0]
    drawn = max(mixture_counts(r, c["mixture"]["size"])[1] for c in configs for r in [c["mixture"]["ratio"]]
                if r in chosen)
    return Sweep(model=first["model"], seed=first["seed"], benign=first["mixture"]["benign"]["path"],
                 models=([StudyModel("base", None)] if base else []) + models, benign_drawn=drawn)


def _run_folder(sweep: Path, run: dict) -> Path:
    """A run's folder: its name inside the sweep folder given (a sweep may be copied or moved), else the path the
    sweep recorded."""
    inside = sweep / run["name"]
    return inside if (inside / CFG_FILE).is_file() else Path(run["path"])


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
        write_manifest(out, {**manifest, "training_config": str(sweep_path)})
        train_sweep(train_config, out / "sweep", ratios=config.ratios, device=device, progress=progress, echo=echo)
        sweep_path = out / "sweep"
    found = read_sweep(sweep_path, config.ratios, config.base)
    capability = held_out_for(config.capability, found.seed, found.benign, found.benign_drawn)
    manifest.update(sweep=str(sweep_path), model=found.model, capability_config=capability.model_dump(mode="json"),
                    models=[vars(m) for m in found.models])
    write_manifest(out, manifest)
    battery = config.model_copy(update={"capability": capability})
    measure_subjects(found.model, found.models, battery, out, device=device, progress=progress, echo=echo)
    table = battery_table(out, found.models, config.measures)
    table.insert(1, "ratio", table.model.map({m.name: m.ratio for m in found.models}))
    atomic_write_text(out / TABLE_FILE, table.to_csv(index=False))
    battery_figure(table, "ratio", "misaligned share of training data (%)", out / FIGURE_FILE,
                   x_format=lambda r: f"{r * 100:g}", ringed=0.0, ringed_label="0 % control (benign only)")
    atomic_write_json(out / CFG_FILE, {**manifest, "rows": table.to_dict("records")})
    return table


@register_artifact(MIXTURE_STUDY_KIND)
def read_mixture_study(folder: PathLike) -> pd.DataFrame:
    """`em.load(OUT)` of a mixture study: its table."""
    return pd.read_csv(Path(folder) / TABLE_FILE)


def build_study_config(path: PathLike | None = None, **flags) -> MixtureStudyConfig:
    """A MixtureStudyConfig from a YAML file (optional; a section such as `honesty` keeps the study's defaults it
    does not name) with flags laid over it (None = not given)."""
    return MixtureStudyConfig.from_yaml(path, **flags)
