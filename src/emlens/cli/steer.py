"""`emlens steer SPEC.yaml`, `emlens ablate-weights`, `emlens monitor`, `emlens bench steer`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emlens.cli.app import ADAPTER_OPT, DEVICE_OPT, ENGINE_OPT, MODEL_OPT, TP_OPT, app, bench_app, given, load


@app.command("steer")
def steer_command(
    spec: Path = typer.Argument(..., help="steering spec YAML (see steering/)"),
    out: Path = typer.Option(..., "--out", "-o", help="experiment folder (re-run to resume)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="override the spec's model"),
    adapter: Optional[str] = typer.Option(None, "--adapter", "-a", help="override the spec's adapter"),
    direction: Optional[str] = typer.Option(None, "--direction", help="override the spec's direction folder"),
    limit: Optional[int] = typer.Option(None, "--limit", help="first N questions of every setting"),
    samples: Optional[int] = typer.Option(None, "--samples", help="free-form samples per paraphrase"),
    device: Optional[str] = DEVICE_OPT, engine: Optional[str] = ENGINE_OPT,
    tensor_parallel_size: Optional[int] = TP_OPT,
) -> None:
    """Re-run an eval setting under each intervention (direction x scales, random control): table + figure."""
    from emlens.judges.preflight import preflight_judge
    from emlens.study.steer import load_spec, print_steer, run_steer

    steer_spec, base = load_spec(spec, {"model": model, "adapter": adapter, "direction": direction},
                                 limit=limit, samples=samples, engine=engine)
    preflight_judge(steer_spec.eval.judge, steer_spec.eval.judge_model)  # before the model is loaded
    handle = load(steer_spec.model, steer_spec.adapter, device, tensor_parallel_size=tensor_parallel_size)
    run_steer(steer_spec, base, out, handle=handle, echo=typer.echo)
    print_steer(out, echo=typer.echo)


@app.command("ablate-weights")
def ablate_weights_command(
    adapter: str = typer.Argument(..., help="PEFT adapter folder or RUN@STEP"),
    direction: Path = typer.Option(..., "--direction", help="direction artifact folder"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the ablated adapter"),
    layer: Optional[int] = typer.Option(None, "--layer", help="direction layer (default: its best layer)"),
    force: bool = typer.Option(False, "--force",
                               help="replace OUT even when it is not an adapter this command wrote before"),
) -> None:
    """Project a direction out of the LoRA B matrices that write into the residual stream."""
    from emlens.directions.artifact import Direction
    from emlens.steering.weights import ablate_adapter_weights

    vector = Direction.load(direction).vector(layer)
    typer.echo(f"wrote {ablate_adapter_weights(adapter, vector, out, overwrite=force)} (evaluate it with --adapter)")


@app.command("monitor")
def monitor_command(
    table: Path = typer.Argument(..., help="eval run folder or samples.parquet"),
    direction: Path = typer.Option(..., "--direction", help="direction artifact folder"),
    target: Optional[str] = typer.Option(None, "--target", help="behaviour column to correlate with (default: "
                                                                "misaligned)"),
    setting: Optional[str] = typer.Option(None, "--setting",
                                          help="rows of this setting only (default: free_form; '' for every row)"),
    layer: Optional[int] = typer.Option(None, "--layer", help="default: the direction's best layer"),
    position: Optional[str] = typer.Option(None, "--position", help="mean_response (the default) or last_prompt"),
    force: bool = typer.Option(False, "--force", help="allow a direction fitted on another base model"),
    backend: Optional[str] = typer.Option(None, "--backend", help="extraction backend: torch-hooks (the default), "
                                                                  "transformerlens, nnsight, vllm"),
    model: Optional[str] = MODEL_OPT, adapter: Optional[str] = ADAPTER_OPT, device: Optional[str] = DEVICE_OPT,
    tensor_parallel_size: Optional[int] = TP_OPT,
) -> None:
    """Correlate the projection of each sample's activations onto a direction with a behaviour (r, 95 % CI)."""
    from emlens.analysis.monitor import monitor, print_monitor
    from emlens.directions.artifact import Direction
    from emlens.runs import read_samples

    frame, found = read_samples(table), Direction.load(direction)
    handle = load(model, adapter, device, tensor_parallel_size=tensor_parallel_size)
    result = monitor(handle, frame, found, force=force,
                     **given(target=target, setting=setting, layer=layer, position=position, backend=backend))
    print_monitor(result, echo=typer.echo)


@bench_app.command("steer")
def bench_steer_command(
    batch: int = typer.Option(32, "--batch"),
    new_tokens: int = typer.Option(64, "--new-tokens"),
    layer: Optional[int] = typer.Option(None, "--layer", help="default: the middle layer"),
    repeats: Optional[int] = typer.Option(None, "--repeats", min=1, help="interleaved runs of each; the best counts"),
    engine: str = typer.Option("hf", "--engine", help="hf or vllm (vllm: the hf engine is timed beside it)"),
    model: Optional[str] = MODEL_OPT, device: Optional[str] = DEVICE_OPT, tensor_parallel_size: Optional[int] = TP_OPT,
) -> None:
    """Steered vs unsteered batched generation tokens/s; last line includes steered_vs_plain."""
    from emlens.bench.steer import bench_steer

    handle = load(model, None, device, tensor_parallel_size=tensor_parallel_size)
    bench_steer(handle, batch, new_tokens, layer, engine=engine, echo=typer.echo, **given(repeats=repeats))


@bench_app.command("diff")
def bench_diff_command(
    rows: int = typer.Option(8, "--rows", min=1, help="judged answers in the batch"),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="answer tokens kept of each"),
    repeats: Optional[int] = typer.Option(None, "--repeats", min=1, help="interleaved runs of each; the best counts"),
    adapter: Optional[str] = typer.Option(None, "--adapter", "-a", help="PEFT adapter folder or RUN@STEP "
                                                                         "(default: a random LoRA)"),
    model: Optional[str] = MODEL_OPT, device: Optional[str] = DEVICE_OPT,
) -> None:
    """`emlens diff`'s per-token KL pass over two plain forward passes of the same tokens; last line includes
    kl_vs_forwards."""
    from emlens.bench.diff import bench_diff

    handle = load(model, None, device)
    bench_diff(handle, rows, max_tokens, adapter=adapter, echo=typer.echo, **given(repeats=repeats))
