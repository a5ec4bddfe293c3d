"""`emlens run EXPERIMENT.yaml`: the whole study, stage by stage, into one report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emlens.cli.app import (
    DEVICE_OPT,
    ENGINE_OPT,
    TP_OPT,
    app,
    given,
    parse_fractions,
    quiet_libraries,
    use_vllm_options,
)


@app.command("run")
def run_command(
    experiment: Path = typer.Argument(..., help="experiment YAML (see experiments/)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="report folder (default: artifacts/runs/NAME)"),
    plan_only: bool = typer.Option(False, "--plan", help="print the stages, what is done and what each will cost"),
    stages: Optional[Path] = typer.Option(None, "--stages", help="shared stage folder (default: artifacts/stages)"),
    force: bool = typer.Option(False, "--force", help="replace an --out folder that is not an earlier report"),
    device: Optional[str] = DEVICE_OPT, engine: Optional[str] = ENGINE_OPT,
    tensor_parallel_size: Optional[int] = TP_OPT,
) -> None:
    """Train, evaluate, fit directions, steer and compare as the experiment says; reuse finished stages."""
    from emlens.study import plan_experiment, run_experiment
    from emlens.study.stages import DEFAULT_STAGES

    root = stages or DEFAULT_STAGES
    if plan_only:
        for line in plan_experiment(experiment, root, engine=engine, device=device or "auto"):
            typer.echo(line)
        return
    use_vllm_options(tensor_parallel_size)
    out = run_experiment(experiment, out, root, device=device or "auto", force=force, engine=engine,
                         echo=typer.echo)
    typer.echo(f"wrote {out / 'report.html'} and {out / 'report.md'}")


@app.command("mixture-study")
def mixture_study_command(
    sweep: Path = typer.Argument(..., help="a sweep folder of `emlens train sweep`, or its training YAML (then "
                                           "the sweep is trained into OUT/sweep first)"),
    out: Path = typer.Option(..., "--out", "-o", help="study folder (re-run the same command to resume)"),
    config_file: Optional[Path] = typer.Option(None, "--config", help="YAML MixtureStudyConfig: measures, ratios, "
                                                                      "and the honesty / free_form / capability "
                                                                      "configs"),
    ratios: Optional[str] = typer.Option(None, "--ratios", help="comma-separated subset of the sweep's ratios, "
                                                                "e.g. 0,0.02,0.1,0.5"),
    measures: Optional[str] = typer.Option(None, "--measures", help="comma-separated: honesty, free_form, "
                                                                    "capability (default: all)"),
    base: Optional[bool] = typer.Option(None, "--base/--no-base", help="also the base model (default on)"),
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Honesty, free-form EM and capability of every adapter of a mixture sweep against its ratio, beside the base
    model and the 0 % control: OUT/mixture.csv (rates with n and 95 % CI) and OUT/mixture.png."""
    from emlens.judges.preflight import preflight_judges
    from emlens.study.battery import battery_judges, report_lines
    from emlens.study.mixture import build_study_config, run_mixture_study

    config = build_study_config(
        config_file, ratios=parse_fractions(ratios),
        measures=measures.split(",") if measures else None, base=base)
    preflight_judges(battery_judges(config))  # before the sweep is trained or measured
    quiet_libraries()
    table = run_mixture_study(sweep, out, config, echo=typer.echo, **given(device=device))
    typer.echo(f"wrote {out / 'mixture.csv'} and {out / 'mixture.png'}")
    for line in report_lines(table):
        typer.echo(line)


@app.command("measures")
def measures_command() -> None:
    """List the registered measures: each is a section an experiment may name, a stage per model and a report
    section (see `emlens.evaluation.measures.register_measure`)."""
    from emlens.evaluation.measures import MEASURES

    for measure in MEASURES.values():
        typer.echo(f"{measure.name:<12} config={measure.config.__name__:<18} results_version={measure.results_version} "
                   f"module={measure.run.__module__}")
        typer.echo(f"{'':<12} {measure.description}")
