"""`emlens run EXPERIMENT.yaml`: the whole study, stage by stage, into one report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emlens.cli.app import DEVICE_OPT, ENGINE_OPT, TP_OPT, app, use_vllm_options


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
        for line in plan_experiment(experiment, root, engine=engine):
            typer.echo(line)
        return
    use_vllm_options(tensor_parallel_size)
    out = run_experiment(experiment, out, root, device=device or "auto", force=force, engine=engine,
                         echo=typer.echo)
    typer.echo(f"wrote {out / 'report.html'} and {out / 'report.md'}")
