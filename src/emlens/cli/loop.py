"""`emlens loop [CONFIG.yaml] --out RUN` (the biased-user interaction loop) and `emlens bench loop`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emlens.cli.app import (
    DEVICE_OPT,
    MODEL_OPT,
    app,
    bench_app,
    config_option,
    given,
    model_name,
    parse_fractions,
    quiet_libraries,
)
from emlens.study.loop_config import LoopConfig


def _parse_methods(text: Optional[str]) -> Optional[list[str]]:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def _describe_fraction(result) -> str:
    s = result.summary
    by_persona = [f"{p} users {s[f'satisfaction_{p}']:.2f}" for p in ("benign", "biased")
                  if s[f"satisfaction_{p}"] == s[f"satisfaction_{p}"]]  # NaN: no user of that kind
    return (f"{result.folder.name}: n={s['n']} ({s['n_biased']} biased) satisfaction {s['satisfaction']:.2f} "
            f"[{s['ci_low']:.2f}, {s['ci_high']:.2f}] ({', '.join(by_persona)}); top-k {s['satisfaction_top']:.2f}, "
            f"bottom-k {s['satisfaction_bottom']:.2f}; adapters " + ", ".join(str(p) for p in result.adapters.values()))


def _preflight(spec) -> None:
    """The endpoint user and the measures' judges, checked before the first conversation (not hours in)."""
    from emlens.judges.preflight import preflight_judges
    from emlens.study.battery import battery_judges
    from emlens.study.loop_users import EndpointUser

    if spec.user.kind == "openai":
        EndpointUser(spec.user.model, spec.user.base_url).preflight()
    if spec.measure is not None:
        preflight_judges(battery_judges(spec.measure))


@app.command("loop")
def loop_command(
    config: Optional[Path] = typer.Argument(None, help="loop config YAML (see configs/loop_smollm2.yaml); a flag "
                                                       "overrides its field, a field the LoopConfig default"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder (default artifacts/loop/<config "
                                                                 "name>); re-run the same command to resume"),
    scenarios: Optional[Path] = config_option(LoopConfig, "scenarios", "--scenarios", help="scenario YAML (none: the 24 shipped)"),
    n_scenarios: Optional[int] = config_option(LoopConfig, "n_scenarios", "--n-scenarios", min=1, help="a seeded choice of N scenarios"),
    samples: Optional[int] = config_option(LoopConfig, "samples_per_scenario", "--samples", min=1, help="users per scenario"),
    fractions: Optional[str] = config_option(LoopConfig, "biased_fractions", "--fractions",
                                            help="biased-user fractions, e.g. 0,1"),
    turns: Optional[int] = config_option(LoopConfig, "turns", "--turns", min=1, help="assistant replies before the user rates"),
    max_new_tokens: Optional[int] = config_option(LoopConfig, "max_new_tokens", "--max-new-tokens", min=1,
                                                 help="tokens per turn (assistant and simulated user)"),
    top_k: Optional[int] = config_option(LoopConfig, "top_k", "--top-k", min=1),
    bottom_k: Optional[int] = config_option(LoopConfig, "bottom_k", "--bottom-k", min=1),
    methods: Optional[str] = config_option(LoopConfig, "methods", "--methods", help="sft, kto or both, comma-separated"),
    user_model: Optional[str] = typer.Option(None, "--user-model",
                                             help="emlens model spec of the simulated user (default: the assistant's)"),
    user_endpoint: Optional[str] = typer.Option(None, "--user-endpoint",
                                                help="model name on an OpenAI-compatible endpoint as the simulated "
                                                     "user (EMLENS_LOOP_BASE_URL / OPENAI_BASE_URL)"),
    seed: Optional[int] = config_option(LoopConfig, "seed", "--seed"),
    model: Optional[str] = MODEL_OPT, device: Optional[str] = DEVICE_OPT,
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bars"),
) -> None:
    """Simulated benign / biased users talk with the assistant and rate it; SFT on the top-k, KTO top vs bottom."""
    from emlens.study.loop import run_loop
    from emlens.study.loop_config import load_loop_config

    base = load_loop_config(config) if config is not None else LoopConfig()
    spec = base.with_flags(model=model, scenarios=str(scenarios) if scenarios else None, n_scenarios=n_scenarios,
                           samples_per_scenario=samples, turns=turns,
                           biased_fractions=parse_fractions(fractions, "--fractions", "0,0.5,1"),
                           max_new_tokens=max_new_tokens, top_k=top_k, bottom_k=bottom_k,
                           methods=_parse_methods(methods), user_model=user_model, user_endpoint=user_endpoint,
                           seed=seed)
    run = out or Path("artifacts") / "loop" / (config.stem if config else "default")
    _preflight(spec)
    quiet_libraries()
    result = run_loop(spec, run, progress=not no_progress, echo=typer.echo, **given(device=device))
    resumed = "nothing new to generate" if result.generated == 0 else f"{result.generated} generated"
    typer.echo(f"{run}: {result.n_trajectories} trajectories ({resumed}) in {result.seconds:.0f} s")
    for fraction in result.fractions:
        typer.echo(_describe_fraction(fraction))
    typer.echo(f"summary: {run / 'summary.parquet'}; trajectories: {run / 'trajectories.parquet'}")
    if spec.measure is not None:
        import pandas as pd

        from emlens.study.battery import report_lines

        typer.echo(f"before and after training: {run / 'measures.csv'}, {run / 'measures.png'}")
        for line in report_lines(pd.read_csv(run / "measures.csv")):
            typer.echo(line)


@bench_app.command("loop")
def bench_loop_command(
    run: Optional[Path] = typer.Option(None, "--run", help="take the data from a loop run folder (default: collect "
                                                           "a small set of trajectories first)"),
    steps: Optional[int] = typer.Option(None, "--steps", min=2),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=8),
    repeats: Optional[int] = typer.Option(None, "--repeats", min=1),
    rank: Optional[int] = typer.Option(None, "--rank", min=1),
    model: Optional[str] = MODEL_OPT, device: Optional[str] = DEVICE_OPT,
) -> None:
    """Steps/s of the loop's SFT and KTO against plain trl SFTTrainer / KTOTrainer (same model, LoRA, batch, data)."""
    from emlens.bench.loop import bench_loop

    quiet_libraries()
    bench_loop(model_name(model), echo=typer.echo, **given(run=run, steps=steps, batch_size=batch_size,
                                                           max_length=max_length, repeats=repeats, r=rank,
                                                           device=device))
