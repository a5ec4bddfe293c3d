"""`emlens extract`, `emlens probe fit|show`, `emlens compare`, `emlens bench extract`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emlens.base.errors import EmlensInputError
from emlens.cli.app import ADAPTER_OPT, DEVICE_OPT, MODEL_OPT, app, bench_app, load

probe_app = typer.Typer(help="Fit linear probes and directions from a spec (probes/*.yaml).", no_args_is_help=True)
app.add_typer(probe_app, name="probe")


@app.command("extract")
def extract_command(
    out: Path = typer.Option(..., "--out", "-o", help="activation store folder to write"),
    questions: Optional[str] = typer.Option(None, "--questions", "-q", help="question/prompt file or bundled set"),
    table: Optional[Path] = typer.Option(None, "--table", "-t", help="eval run folder, .parquet or .csv table"),
    nudge: list[str] = typer.Option([], "--nudge", "-n", help="repeatable, with --questions: none, evil, hhh, ..."),
    nudges_file: Optional[Path] = typer.Option(None, "--nudges", help="YAML of user-defined nudges"),
    system: Optional[str] = typer.Option(None, "--system", help="system prompt for every --questions chat"),
    site: list[str] = typer.Option(["resid_post"], "--site", "-s",
                                   help="repeatable: a kind (resid_post), blocks.*.hook_mlp_out or blocks.3.hook_resid_pre"),
    layers: str = typer.Option("all", "--layers", "-l", help="all, 15, 0-5,10 (for kinds and patterns)"),
    position: str = typer.Option("last_prompt", "--position", "-p", help="last_prompt, mean_response or all"),
    backend: str = typer.Option("torch-hooks", "--backend", help="torch-hooks, transformerlens or nnsight"),
    no_response: bool = typer.Option(False, "--no-response", help="with --table: read the prompts only"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="first N questions or table rows"),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    max_response_tokens: Optional[int] = typer.Option(None, "--max-response-tokens", min=1),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16 in the store"),
    shard_mb: float = typer.Option(32.0, "--shard-mb", help="shard size (bounds the writer's memory)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing store"),
    model: str = MODEL_OPT, adapter: Optional[str] = ADAPTER_OPT, device: str = DEVICE_OPT,
) -> None:
    """Read activations of prompts (--questions) or prompt+response rows (--table) into an activation store."""
    from emlens.capture.backends import make_backend
    from emlens.capture.extract import extract_to_store
    from emlens.capture.items import (
        check_position,
        items_from_questions,
        items_from_run_table,
    )
    from emlens.data.nudges import resolve_nudges
    from emlens.directions.specs import read_table
    from emlens.sites import resolve_sites

    if (questions is None) == (table is None):
        raise EmlensInputError("extract: give exactly one of --questions, --table")
    if out.exists() and not overwrite:
        raise EmlensInputError(f"{out}: already exists (use another --out or --overwrite)")
    check_position(position)
    if table is not None:
        if not table.exists():
            raise EmlensInputError(f"{table}: no such table")
        frame = read_table(table)
        items = items_from_run_table(frame.head(limit) if limit else frame, with_response=not no_response)
    else:
        items = items_from_questions(questions, resolve_nudges(nudge, nudges_file) if nudge else (), system, limit)
    handle = load(model, adapter, device)
    sites = resolve_sites(site, handle.n_layers, layers)
    make_backend(handle, backend) if backend != "torch-hooks" else None  # fail early on an unknown backend
    store = extract_to_store(handle, items, out, sites, position, backend, batch_size, max_response_tokens, dtype,
                             shard_mb, manifest={"source": str(table or questions)})
    typer.echo(f"wrote {out}: {len(store)} rows, {store.manifest['n_vectors']} vectors x {len(sites)} sites "
               f"({sites[0].name} ... {sites[-1].name}), position {position}, backend {backend}")


@probe_app.command("fit")
def probe_fit_command(
    spec: Path = typer.Argument(..., help="probe spec YAML (see probes/)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="artifact folder (default artifacts/directions/NAME-FINGERPRINT)"),
    store: Optional[Path] = typer.Option(None, "--store", help="activation store: reused if it matches, else written"),
    table: Optional[Path] = typer.Option(None, "--table", "-t", help="eval table replacing the spec's table(s)"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="rows per side (or score rows)"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="value of ${EMLENS_SHARED_DATA} in specs"),
    backend: Optional[str] = typer.Option(None, "--backend", help="override the spec's backend"),
    model: str = MODEL_OPT, adapter: Optional[str] = ADAPTER_OPT, device: str = DEVICE_OPT,
) -> None:
    """Extract the spec's rows, fit every layer (held-out metrics by prompt group), write the artifact."""
    from emlens.directions.probe import fit_probe
    from emlens.directions.specs import load_spec

    load_spec(spec)  # a bad spec fails before the model loads
    handle = load(model, adapter, device)
    artifact = fit_probe(spec, handle, out=out, store=store, table=str(table) if table else None, limit=limit,
                         data_root=data_root, backend=backend)
    echo_metrics(artifact)
    typer.echo(f"wrote {artifact.path}")


def echo_metrics(artifact) -> None:
    metrics = artifact.metrics()
    columns = [c for c in ("auroc", "accuracy", "separation", "r2", "pearson_r", "explained_variance", "raw_norm")
               if c in metrics and metrics[c].notna().any()]
    typer.echo(f"{artifact!r}")
    typer.echo(f"{'layer':>5} " + " ".join(f"{c:>10}" for c in columns))
    for row in metrics.to_dict("records"):
        mark = " <- best" if row["layer"] == artifact.best_layer else ""
        typer.echo(f"{row['layer']:>5} " + " ".join(f"{row[c]:>10.3f}" for c in columns) + mark)
    best = artifact.cfg.best_metrics
    summary = {k: round(float(best[k]), 3) for k in columns if k in best}
    typer.echo(f"best_layer={artifact.best_layer} " + " ".join(f"{k}={v}" for k, v in summary.items()))


@probe_app.command("show")
def probe_show_command(artifact: Path = typer.Argument(..., help="direction or probe folder")) -> None:
    """Print an artifact's provenance summary and per-layer metrics."""
    from emlens.directions.artifact import Direction

    direction = Direction.load(artifact)
    model, data = direction.cfg.model, direction.cfg.data
    typer.echo(f"model={model.get('model')} adapter={model.get('adapter')} fingerprint={model.get('fingerprint')} "
               f"position={direction.cfg.position} data_hash={data.get('hash')} n={data.get('n')}")
    echo_metrics(direction)


@app.command("compare")
def compare_command(
    directions: list[Path] = typer.Argument(..., help="two or more direction folders, in series order"),
    out: Path = typer.Option(Path("artifacts/compare"), "--out", "-o", help="folder for tables and figures"),
    store: list[Path] = typer.Option([], "--store", help="repeatable: activation stores to project onto each"),
    force: bool = typer.Option(False, "--force", help="compare directions of other base models or site kinds"),
) -> None:
    """Cosines checkpoints x layers (with a random baseline), drift along the series, projections; heatmap."""
    from emlens.analysis.compare import compare_directions

    tables = compare_directions(directions, out, stores=store, force=force)
    cos = tables["cosine"]
    baseline = float(cos["random_p95"].iloc[0]) if len(cos) else float("nan")
    for (a, b), part in cos.groupby(["a", "b"], sort=False):
        best = part.loc[part.cosine.abs().idxmax()]
        typer.echo(f"{b} vs {a}: cos min {part.cosine.min():.3f} median {part.cosine.median():.3f} "
                   f"max {part.cosine.max():.3f} (layer {int(best.layer)}); random p95 {baseline:.3f}")
    if "projection" in tables and "auroc" in tables["projection"]:
        proj = tables["projection"]
        for (s, d), part in proj.groupby(["store", "direction"], sort=False):
            top = part.loc[part.auroc.idxmax()]
            typer.echo(f"store {s} on {d}: best auroc {top.auroc:.3f} at layer {int(top.layer)} "
                       f"(random direction {top.auroc_random_direction:.3f})")
    typer.echo(f"wrote {out}/compare.png, cosine.parquet, drift.parquet" +
               (", projection.parquet" if "projection" in tables else ""))
    typer.echo(f"pairs={cos.groupby(['a', 'b']).ngroups} layers={cos.layer.nunique()} random_p95={baseline:.4f} "
               f"median_cos={cos.cosine.median():.4f}")


@bench_app.command("extract")
def bench_extract_command(
    prompts: int = typer.Option(64, "--prompts", min=1),
    tokens: int = typer.Option(128, "--tokens", min=2),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    repeats: int = typer.Option(3, "--repeats", min=1),
    backends: str = typer.Option("torch-hooks,nnsight,transformerlens", "--backends"),
    memory_tokens: int = typer.Option(16, "--memory-tokens", min=2, help="tokens per prompt in the memory runs"),
    memory_multiples: str = typer.Option("1,4,16", "--memory-multiples"),
    shard_mb: float = typer.Option(32.0, "--shard-mb"),
    model: str = MODEL_OPT, device: str = DEVICE_OPT,
) -> None:
    """Extraction (all layers' resid_post) vs a bare forward without the LM head, per backend; memory vs N."""
    from emlens.bench.extract import bench_extract
    from emlens.capture.backends import BACKENDS

    chosen = [b.strip() for b in backends.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BACKENDS]
    if unknown:
        raise EmlensInputError(f"--backends: unknown {', '.join(unknown)} (known: {', '.join(BACKENDS)})")
    handle = load(model, None, device)
    bench_extract(handle, prompts, tokens, batch_size, repeats, chosen,
                  tuple(int(m) for m in memory_multiples.split(",")), memory_tokens, shard_mb, echo=typer.echo)
