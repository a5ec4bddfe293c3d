"""Sweeps: one training run per mixture ratio or dataset, sharing a folder."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from emlens.base.errors import EmlensInputError
from emlens.base.io import (
    CFG_FILE,
    FORMAT_VERSION,
    artifact_kind,
    atomic_write_json,
    check_writable_folder,
    read_json,
    write_manifest,
)
from emlens.training.config import (
    DEFAULT_RATIOS,
    SweepSettings,
    TrainConfig,
    naming_the_config,
    parse_config,
)
from emlens.training.data import _SourceCache, build_training_data
from emlens.training.runfolder import SWEEP_KIND, package_versions
from emlens.training.trainer import TrainResult, train

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- sweeps


def ratio_name(ratio: float) -> str:
    return f"ratio-{ratio * 100:g}pct"


def sweep_configs(config: TrainConfig, ratios: list[float] | None = None,
                  datasets: dict[str, str] | None = None) -> list[tuple[str, TrainConfig]]:
    """(run name, config) for every dataset x mixture ratio; arguments override the config's `sweep` section.

    With a mixture, ratios default to 0, 1, 2, 5, 10, 20, 30, 50 %. A dataset sweep replaces the misaligned
    source of a mixture, or the dataset of a plain config.
    """
    settings = config.sweep or SweepSettings()
    ratios = list(ratios) if ratios is not None else settings.ratios
    datasets = dict(datasets) if datasets is not None else settings.datasets
    if ratios is not None and config.mixture is None:
        raise EmlensInputError("field 'sweep.ratios': a ratio sweep needs a 'mixture' section in the config")
    if ratios is None and config.mixture is not None:
        ratios = list(DEFAULT_RATIOS)
    if ratios is None and datasets is None:
        raise EmlensInputError("field 'sweep': nothing to sweep (give 'sweep.datasets', or a 'mixture' for ratios)")
    base = config.model_dump(exclude={"sweep"})
    runs = []
    for name, path in (datasets or {None: None}).items():
        for ratio in ratios or [None]:
            fields = json.loads(json.dumps(base))
            slot = fields["mixture"]["misaligned"] if config.mixture is not None else fields["dataset"]
            if path is not None:
                slot["path"] = path
            if ratio is not None:
                fields["mixture"]["ratio"] = ratio
            run_name = "-".join(p for p in (name, ratio_name(ratio) if ratio is not None else None) if p)
            run_config = parse_config(fields, where=f"{config._source}, sweep run {run_name}")
            run_config._source = config._source
            runs.append((run_name, run_config))
    return runs


def train_sweep(config: TrainConfig, out: str | Path, *, ratios: list[float] | None = None,
                datasets: dict[str, str] | None = None, device: str = "auto", progress: bool = True,
                echo: Callable[[str], None] = log.info) -> list[TrainResult]:
    """One adapter per sweep point into OUT/<name>/; OUT/cfg.json (kind training_sweep) indexes them.
    Finished runs are skipped."""
    out = Path(out)
    with naming_the_config(config):
        runs = sweep_configs(config, ratios, datasets)
        cache = _SourceCache()
        for _name, run_config in runs:  # every data set is built (and checked) before any training
            build_training_data(run_config, cache)
    main = is_main_process()
    index = {"kind": SWEEP_KIND, "format_version": FORMAT_VERSION, "runs": [{"name": n, "path": str(out / n), "config": c.run_config()} for n, c in runs],
             "versions": package_versions()}
    if main:
        check_writable_folder(out, SWEEP_KIND)
        index["runs"] = _earlier_runs(out, {name for name, _ in runs}) + index["runs"]
        write_manifest(out, index)
    results = []
    for i, (name, run_config) in enumerate(runs, start=1):
        if main:
            echo(f"[{i}/{len(runs)}] {name}")
        result = train(run_config, out / name, device=device, progress=progress, echo=echo, cache=cache)
        results.append(result)
        if main:
            entry = next(r for r in index["runs"] if r["name"] == name)
            entry.update(final_step=result.final_step, final_loss=result.final_loss)
            atomic_write_json(out / CFG_FILE, index)
    return results


def _earlier_runs(out: Path, names: set[str]) -> list[dict]:
    """The runs an earlier call indexed in this folder (other ratios or datasets), still listed: a sweep grows."""
    if artifact_kind(out) != SWEEP_KIND:
        return []
    return [run for run in read_json(out / CFG_FILE)["runs"] if run["name"] not in names]


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun / accelerate set RANK), or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


def sweep_runs(folder: str | Path) -> list[Path]:
    """Run folders listed in a sweep's cfg.json (empty when `folder` is not a sweep)."""
    path = Path(folder) / CFG_FILE
    if artifact_kind(folder) != SWEEP_KIND:
        return []
    return [Path(r["path"]) for r in json.loads(path.read_text())["runs"]]
