"""`emlens steer SPEC.yaml`, `emlens ablate-weights`, `emlens monitor`, `emlens bench steer`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emlens.cli.app import ADAPTER_OPT, DEVICE_OPT, MODEL_OPT, app, bench_app, load


@app.command("steer")
def steer_command(
    spec: Path = typer.Argument(..., help="steering spec YAML (see steering/)"),
    out: Path = typer.Option(..., "--out", "-o", help="experiment folder (re-run to resume)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="override the spec's model"),
    adapter: Optional[str] = typer.Option(None, "--adapter", "-a", help="override the spec's adapter"),
    direction: Optional[str] = typer.Option(None, "--direction", help="override the spec's direction folder"),
    limit: Optional[int] = typer.Option(None, "--limit", help="first N questions of every setting"),
    samples: Optional[int] = typer.Option(None, "--samples", help="free-form samples per paraphrase"),
    device: str = DEVICE_OPT,
) -> None:
    """Re-run an eval setting under each intervention (direction x scales, random control): table + figure."""
    import pandas as pd

    from emlens.analysis.dose_response import load_spec, run_steer

    overrides = {"model": model, "adapter": adapter, "direction": str(Path(direction).resolve()) if direction else None}
    steer_spec, base = load_spec(spec, overrides)
    update = steer_spec.eval.model_dump()
    if limit is not None:
        for section in ("free_form", "deception", "refusal", "factual"):
            update[section]["limit"] = limit
    if samples is not None:
        update["free_form"]["samples"] = samples
    steer_spec = steer_spec.model_copy(update={"eval": type(steer_spec.eval).model_validate(update)})
    handle = load(steer_spec.model, steer_spec.adapter, device)
    curves = run_steer(steer_spec, base, out, handle=handle, echo=typer.echo)
    for _, row in curves.iterrows():
        typer.echo(f"{row['intervention']:<22} {row['nudge']:<6} {row['measure']:<24} "
                   f"{row['rate']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] n={row['n']}")
    paired = pd.read_csv(out / "direction_vs_control.csv")
    for _, row in paired.iterrows():
        typer.echo(f"direction - control {row['operation']}@{row['alpha']:g} {row['nudge']:<6} {row['measure']:<24} "
                   f"{row['difference']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}] pairs={row['n_pairs']}")
    typer.echo(f"wrote {out / 'samples.parquet'}, {out / 'dose_response.csv'}, {out / 'direction_vs_control.csv'}, "
               f"{out / 'dose_response.png'}")


@app.command("ablate-weights")
def ablate_weights_command(
    adapter: str = typer.Argument(..., help="PEFT adapter folder or RUN@STEP"),
    direction: Path = typer.Option(..., "--direction", help="direction artifact folder"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the ablated adapter"),
    layer: Optional[int] = typer.Option(None, "--layer", help="direction layer (default: its best layer)"),
) -> None:
    """Project a direction out of the LoRA B matrices that write into the residual stream."""
    from emlens.directions.artifact import Direction
    from emlens.steering.weights import ablate_adapter_weights

    vector = Direction.load(direction).vector(layer)
    typer.echo(f"wrote {ablate_adapter_weights(adapter, vector, out)} (evaluate it with --adapter)")


@app.command("monitor")
def monitor_command(
    table: Path = typer.Argument(..., help="eval run folder or samples.parquet"),
    direction: Path = typer.Option(..., "--direction", help="direction artifact folder"),
    target: str = typer.Option("misaligned", "--target", help="behaviour column to correlate with"),
    setting: Optional[str] = typer.Option("free_form", "--setting", help="rows of this setting only"),
    layer: Optional[int] = typer.Option(None, "--layer"),
    position: str = typer.Option("response_mean", "--position", help="response_mean or last_prompt"),
    force: bool = typer.Option(False, "--force", help="allow a direction fitted on another base model"),
    model: str = MODEL_OPT, adapter: Optional[str] = ADAPTER_OPT, device: str = DEVICE_OPT,
) -> None:
    """Correlate the projection of each sample's activations onto a direction with a behaviour (r, 95 % CI)."""
    from emlens.analysis.monitor import monitor, print_monitor
    from emlens.directions.artifact import Direction
    from emlens.runs import read_samples

    frame = read_samples(table)
    if setting:
        frame = frame[frame.setting == setting]
    result = monitor(load(model, adapter, device), frame, Direction.load(direction), target=target, layer=layer,
                     position=position, force=force)
    print_monitor(result, echo=typer.echo)


@bench_app.command("steer")
def bench_steer_command(
    batch: int = typer.Option(32, "--batch"),
    new_tokens: int = typer.Option(64, "--new-tokens"),
    layer: Optional[int] = typer.Option(None, "--layer", help="default: the middle layer"),
    repeats: int = typer.Option(3, "--repeats", min=1, help="interleaved runs of each; the best counts"),
    model: str = MODEL_OPT, device: str = DEVICE_OPT,
) -> None:
    """Steered vs unsteered batched generation tokens/s; last line includes steered_vs_plain."""
    from emlens.bench.steer import bench_steer

    bench_steer(load(model, None, device), batch, new_tokens, layer, echo=typer.echo, repeats=repeats)
