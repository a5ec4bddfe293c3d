"""Layer 6: `emlens run EXPERIMENT.yaml`, the whole study as one command: stages, plan, report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from emlens.base.io import (
    CFG_FILE,
    FORMAT_VERSION,
    atomic_folder,
    atomic_write_json,
    read_json,
    register_artifact,
    versions,
)
from emlens.evaluation.measures import MEASURES
from emlens.study.experiment import LoadedExperiment
from emlens.study.report import (
    behaviour_blocks,
    compare_blocks,
    direction_blocks,
    eval_tables,
    findings_blocks,
    measure_blocks,
    provenance_blocks,
    steer_blocks,
    token_blocks,
    write_study_report,
)
from emlens.study.stages import DEFAULT_STAGES, describe_plan, plan, run_study

log = logging.getLogger(__name__)
STUDY_KIND = "study"


def plan_experiment(path: str | Path, stages: str | Path = DEFAULT_STAGES, engine: str | None = None,
                    device: str = "auto") -> list[str]:
    """`emlens run --plan`: one line per stage: its key, whether it is done, and what it will cost. `device` as for
    `run_experiment` (it decides what engine `auto` means, and so the keys)."""
    return describe_plan(plan(LoadedExperiment(path, engine=engine), device), Path(stages))


def run_experiment(path: str | Path, out: str | Path | None = None, stages: str | Path = DEFAULT_STAGES,
                   device: str = "auto", progress: bool = True, force: bool = False, engine: str | None = None,
                   echo: Callable[[str], None] = log.info) -> Path:
    """Run (or resume) every stage of the experiment, then write OUT/report.html and OUT/report.md
    (OUT defaults to artifacts/runs/NAME). `engine` (auto, hf, vllm) replaces every eval section's engine."""
    study = LoadedExperiment(path, engine=engine)  # every file it names is read and checked before any work
    out = Path(out) if out is not None else Path("artifacts") / "runs" / study.spec.name
    start = time.time()
    ran, records = run_study(study, Path(stages), device, progress, echo)
    done = list(zip(ran, (Path(record["folder"]) for record in records), strict=True))
    by_kind = lambda kind: {stage.label: folder for stage, folder in done if stage.kind == kind}  # noqa: E731
    evals = by_kind("eval")
    directions: dict[str, dict[str, Path]] = {}
    for stage, folder in done:
        if stage.kind == "direction":
            directions.setdefault(stage.probe, {})[stage.subject] = folder
    with atomic_folder(out, STUDY_KIND, force=force) as tmp:
        (tmp / "eval-figures").mkdir()
        tables = eval_tables(evals)
        blocks = findings_blocks(tables, study.spec.model_contrasts()) if evals else []
        blocks += behaviour_blocks(tables, tmp / "eval-figures") if evals else []
        measured = {name: by_kind(name) for name in MEASURES if by_kind(name)}
        blocks += measure_blocks(measured, tmp / "eval-figures") if measured else []
        blocks += direction_blocks(directions, tmp / "eval-figures") if directions else []
        blocks += _token_blocks(study, tables, directions, tmp / "eval-figures", device) if evals else []
        blocks += compare_blocks(by_kind("compare")) if by_kind("compare") else []
        blocks += [b for folder in by_kind("steer").values() for b in steer_blocks(folder)]
        blocks += provenance_blocks(records, evals, time.time() - start)
        write_study_report(study.spec.name, blocks, tmp)
        atomic_write_json(tmp / "cfg.json", {"kind": STUDY_KIND, "format_version": FORMAT_VERSION,
                                             "experiment": str(Path(path).resolve()), "stages": records,
                                             "seconds": round(time.time() - start, 1), "versions": versions()})
    return out


def _token_blocks(study: LoadedExperiment, tables: dict, directions: dict, figures: Path, device: str) -> list:
    """The misalignment direction (else the first fitted one) token by token on the answers of the first model of
    the first contrast (the insecure one in the shipped studies), with that model's own fit."""
    contrasts = study.spec.model_contrasts()
    subject = contrasts[0][0] if contrasts else next(iter(tables))
    probe = "misalignment" if "misalignment" in directions else next(iter(directions), None)
    if probe is None or subject not in tables or subject not in directions[probe]:
        return []
    return token_blocks(probe, subject, directions[probe][subject], tables[subject], figures, device)


@register_artifact(STUDY_KIND)
def open_study(folder: str | Path) -> dict:
    """`em.load(OUT)` of `emlens run`: the experiment it ran, its stages (name, key, folder, reused, seconds) as a
    table, and the paths of its report."""
    import pandas as pd

    folder = Path(folder)
    cfg = read_json(folder / CFG_FILE)
    return {"experiment": cfg["experiment"], "stages": pd.DataFrame(cfg["stages"]),
            "report": folder / "report.md", "html": folder / "report.html"}
