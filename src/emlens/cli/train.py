"""`emlens train CONFIG.yaml`, `emlens train sweep CONFIG.yaml`, `emlens checkpoints RUN`, `emlens bench train`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from emlens.base.errors import EmlensInputError
from emlens.cli.app import (
    DEVICE_OPT,
    MODEL_OPT,
    app,
    bench_app,
    given,
    model_name,
    parse_fractions,
    quiet_libraries,
)


class _DefaultToRun(TyperGroup):
    """`emlens train CONFIG.yaml` means `emlens train run CONFIG.yaml`; `emlens train sweep ...` stays a sweep."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


train_app = typer.Typer(cls=_DefaultToRun, no_args_is_help=True,
                        help="LoRA fine-tuning: `emlens train CONFIG.yaml` (one adapter) or `emlens train sweep "
                             "CONFIG.yaml` (one adapter per mixture ratio / dataset).")
app.add_typer(train_app, name="train")

CONFIG_ARG = typer.Argument(..., help="training config YAML (see configs/)", exists=False)
NO_PROGRESS_OPT = typer.Option(False, "--no-progress", help="no progress bar")


def _default_out(config: Path) -> Path:
    return Path("artifacts") / "train" / config.stem


def _describe(result) -> str:
    if result.already_complete:
        return f"{result.run}: already complete (step {result.final_step}); nothing to do"
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from is not None else ""
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "-"
    return (f"{result.run}: {result.final_step} steps{resumed}, loss {loss} (mean since the previous checkpoint), "
            f"{result.tokens} tokens in {result.train_seconds:.1f} s ({result.tokens_per_second:.1f} tok/s), "
            f"checkpoints {', '.join(map(str, result.checkpoints))}")


@train_app.command("run")
def train_run_command(
    config: Path = CONFIG_ARG,
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="run folder (default artifacts/train/<config name>); re-run to resume"),
    device: Optional[str] = DEVICE_OPT,
    no_progress: bool = NO_PROGRESS_OPT,
) -> None:
    """Train one LoRA adapter; checkpoints go to OUT/checkpoints/step-N (use as --adapter OUT@N)."""
    from emlens.training.config import load_config
    from emlens.training.trainer import train

    spec = load_config(config)
    run = out or _default_out(config)
    quiet_libraries()
    result = train(spec, run, progress=not no_progress, echo=typer.echo, **given(device=device))
    if not result.main_process:  # other ranks of `accelerate launch` / torchrun stay quiet
        return
    typer.echo(_describe(result))
    if not result.already_complete:
        typer.echo(f"adapter: {run} (final) or {run}@STEP; loss curve: {run / 'loss.png'}")


def _parse_datasets(items: Optional[list[str]]) -> Optional[dict[str, str]]:
    if not items:
        return None
    pairs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EmlensInputError(f"option '--dataset': expected NAME=PATH, got '{item}'")
        pairs[name] = path
    return pairs


@train_app.command("sweep")
def train_sweep_command(
    config: Path = CONFIG_ARG,
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="sweep folder, one run per point (default artifacts/train/<config name>)"),
    ratios: Optional[str] = typer.Option(None, "--ratios",
                                         help="mixture fractions, e.g. 0,0.01,0.02,0.05 (default: the config's "
                                              "sweep.ratios, else 0,.01,.02,.05,.1,.2,.3,.5)"),
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", help="NAME=PATH, repeatable: one run per data set"),
    device: Optional[str] = DEVICE_OPT,
    no_progress: bool = NO_PROGRESS_OPT,
) -> None:
    """One adapter per mixture ratio and/or dataset; finished runs are skipped, a killed one resumes."""
    from emlens.study.sweep import train_sweep
    from emlens.training.config import load_config, with_sweep

    spec = with_sweep(load_config(config), ratios=parse_fractions(ratios), datasets=_parse_datasets(dataset))
    sweep_out = out or _default_out(config)
    quiet_libraries()
    results = train_sweep(spec, sweep_out, progress=not no_progress, echo=typer.echo, **given(device=device))
    if results and not results[0].main_process:
        return
    for result in results:
        typer.echo(_describe(result))
    typer.echo(f"sweep index: {sweep_out / 'cfg.json'}")


@app.command("checkpoints")
def checkpoints_command(run: Path = typer.Argument(..., help="a training run folder, or a sweep folder")) -> None:
    """List the checkpoint series of a run (step, loss, RUN@STEP spec to pass as --adapter)."""
    from emlens.study.sweep import sweep_runs
    from emlens.training.runfolder import list_checkpoints, read_run

    runs = sweep_runs(run)
    for folder in runs or [run]:
        if runs:
            typer.echo(f"# {folder}")
            if read_run(folder) is None:
                typer.echo("  (not started)")
                continue
        rows = list_checkpoints(folder)
        typer.echo(f"{'step':>6} {'epoch':>6} {'loss':>8}  adapter")
        for row in rows:
            loss = f"{row['loss']:.4f}" if row["loss"] is not None else "-"
            epoch = f"{row['epoch']:.2f}" if row["epoch"] is not None else "-"
            typer.echo(f"{row['step']:>6} {epoch:>6} {loss:>8}  {row['spec']}")


@bench_app.command("train")
def bench_train_command(
    data: Optional[Path] = typer.Option(None, "--data",
                                        help="chat JSONL (default: ../shared/data/em_betley/insecure.jsonl, found "
                                             "via EMLENS_SHARED_DATA or walking up from the cwd)"),
    steps: Optional[int] = typer.Option(None, "--steps", min=2),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=8),
    repeats: Optional[int] = typer.Option(None, "--repeats", min=1),
    rank: Optional[int] = typer.Option(None, "--rank", min=1),
    model: Optional[str] = MODEL_OPT, device: Optional[str] = DEVICE_OPT,
) -> None:
    """Training tokens/s of emlens train vs a plain transformers Trainer (same LoRA, data, arguments)."""
    from emlens.base.io import find_shared_data
    from emlens.bench.train import bench_train

    if data is None:
        shared = find_shared_data()
        data = shared / "em_betley" / "insecure.jsonl" if shared else None
        if data is None or not data.exists():
            raise EmlensInputError("option '--data': no shared data found (set EMLENS_SHARED_DATA); pass a chat JSONL")
    quiet_libraries()
    bench_train(model_name(model), data, echo=typer.echo, **given(steps=steps, batch_size=batch_size,
                                                                  max_length=max_length, repeats=repeats, r=rank,
                                                                  device=device))
