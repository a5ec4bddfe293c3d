"""`emlens extract`, `emlens probe fit|show`, `emlens compare`, `emlens bench extract`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emlens.base.errors import EmlensInputError
from emlens.capture.config import ExtractConfig
from emlens.cli.app import (
    ADAPTER_OPT,
    DEVICE_OPT,
    MODEL_OPT,
    TP_OPT,
    app,
    bench_app,
    config_option,
    given,
    load,
    quiet_libraries,
)

probe_app = typer.Typer(help="Fit linear probes and directions from a spec (probes/*.yaml).", no_args_is_help=True)
app.add_typer(probe_app, name="probe")


@app.command("extract")
def extract_command(
    out: Path = typer.Option(..., "--out", "-o", help="activation store folder to write"),
    questions: Optional[str] = config_option(ExtractConfig, "questions", "--questions", "-q", help="question/prompt file or bundled set"),
    table: Optional[Path] = config_option(ExtractConfig, "table", "--table", "-t", help="eval run folder, .parquet or .csv table"),
    nudge: Optional[list[str]] = config_option(ExtractConfig, "nudges", "--nudge", "-n",
                                              help="repeatable, with --questions: none, evil, hhh, ..."),
    nudges_file: Optional[Path] = config_option(ExtractConfig, "nudges_file", "--nudges", help="YAML of user-defined nudges"),
    system: Optional[str] = config_option(ExtractConfig, "system", "--system", help="system prompt for every --questions chat"),
    site: Optional[list[str]] = config_option(ExtractConfig, "sites", "--site", "-s",
                                             help="repeatable: a kind (resid_post), "
                                                  "blocks.*.hook_mlp_out or blocks.3.hook_resid_pre"),
    layers: Optional[str] = config_option(ExtractConfig, "layers", "--layers", "-l", help="all, 15, 0-5,10 (for kinds "
                                                                      "and patterns)"),
    position: Optional[str] = config_option(ExtractConfig, "position", "--position", "-p",
                                           help="last_prompt, mean_response or all"),
    backend: Optional[str] = config_option(ExtractConfig, "backend", "--backend",
                                          help="torch-hooks, transformerlens or nnsight"),
    no_response: bool = typer.Option(False, "--no-response", help="with --table: read the prompts only"),
    limit: Optional[int] = config_option(ExtractConfig, "limit", "--limit", min=1, help="first N questions or table rows"),
    batch_size: Optional[int] = config_option(ExtractConfig, "batch_size", "--batch-size", min=1),
    max_response_tokens: Optional[int] = config_option(ExtractConfig, "max_response_tokens", "--max-response-tokens", min=1),
    dtype: Optional[str] = config_option(ExtractConfig, "dtype", "--dtype", help="float32, float16 or bfloat16 in the store"),
    shard_mb: Optional[float] = config_option(ExtractConfig, "shard_mb", "--shard-mb", help="shard size (bounds the writer's memory)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing store"),
    model: Optional[str] = MODEL_OPT, adapter: Optional[str] = ADAPTER_OPT, device: Optional[str] = DEVICE_OPT,
    tensor_parallel_size: Optional[int] = TP_OPT,
) -> None:
    """Read activations of prompts (--questions) or prompt+response rows (--table) into an activation store."""
    from emlens.base.io import validate
    from emlens.capture.config import check_new_store

    config = validate(ExtractConfig, given(
        questions=questions, table=str(table) if table is not None else None, nudges=nudge or None,
        nudges_file=str(nudges_file) if nudges_file is not None else None, system=system, sites=site or None,
        layers=layers, position=position, backend=backend, response=False if no_response else None, limit=limit,
        batch_size=batch_size, max_response_tokens=max_response_tokens, dtype=dtype, shard_mb=shard_mb),
        "command line")
    check_new_store(out, overwrite)
    items = config.items()  # a bad question file or table fails before the model loads
    store, sites = config.extract(load(model, adapter, device, tensor_parallel_size=tensor_parallel_size), items, out)
    typer.echo(f"wrote {out}: {len(store)} rows, {store.manifest['n_vectors']} vectors x {len(sites)} sites "
               f"({sites[0].name} ... {sites[-1].name}), position {config.position}, backend {config.backend}")


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
    model: Optional[str] = MODEL_OPT, adapter: Optional[str] = ADAPTER_OPT, device: Optional[str] = DEVICE_OPT,
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
    summary = {k: round(float(best[k]), 3) for k in [*columns, "auroc_nested", "r2_nested"] if k in best}
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
    store: Optional[list[Path]] = typer.Option(None, "--store", help="repeatable: activation stores to project onto each"),
    force: bool = typer.Option(False, "--force", help="compare directions of other base models or site kinds"),
) -> None:
    """Cosines checkpoints x layers (with a random baseline), drift along the series, projections; heatmap."""
    from emlens.analysis.compare import compare_directions

    tables = compare_directions(directions, out, force=force, **given(stores=store))
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
    prompts: Optional[int] = typer.Option(None, "--prompts", min=1),
    tokens: Optional[int] = typer.Option(None, "--tokens", min=2),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1),
    repeats: Optional[int] = typer.Option(None, "--repeats", min=1),
    backends: Optional[str] = typer.Option(None, "--backends", help="comma-separated (default: every backend)"),
    memory_tokens: Optional[int] = typer.Option(None, "--memory-tokens", min=2,
                                                help="tokens per prompt in the memory runs"),
    memory_multiples: Optional[str] = typer.Option(None, "--memory-multiples", help="comma-separated, e.g. 1,4,16"),
    shard_mb: Optional[float] = typer.Option(None, "--shard-mb"),
    model: Optional[str] = MODEL_OPT, device: Optional[str] = DEVICE_OPT,
) -> None:
    """Extraction (all layers' resid_post) vs a bare forward without the LM head, per backend; memory vs N."""
    from emlens.bench.extract import bench_extract
    from emlens.capture.backends import BACKENDS

    chosen = [b.strip() for b in backends.split(",") if b.strip()] if backends is not None else None
    unknown = [b for b in chosen or () if b not in BACKENDS]
    if unknown:
        raise EmlensInputError(f"--backends: unknown {', '.join(unknown)} (known: {', '.join(BACKENDS)})")
    multiples = tuple(int(m) for m in memory_multiples.split(",")) if memory_multiples is not None else None
    handle = load(model, None, device)
    bench_extract(handle, echo=typer.echo, **given(prompts=prompts, tokens=tokens, batch_size=batch_size,
                                                   repeats=repeats, backends=chosen, memory_multiples=multiples,
                                                   memory_tokens=memory_tokens, shard_mb=shard_mb))


@app.command("lens")
def lens_command(
    direction: Path = typer.Argument(..., help="direction or probe folder"),
    layer: Optional[int] = typer.Option(None, help="its layer to read (default: its best layer)"),
    top: int = typer.Option(10, min=1, help="tokens on each side"),
    model: Optional[str] = typer.Option(None, help="model whose unembedding reads it (default: the one it was fitted on)"),
    adapter: Optional[str] = typer.Option(None, help="adapter of that model (default: the one it was fitted on)"),
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """The tokens a direction promotes and suppresses: the logit lens, through the model's final norm and
    unembedding."""
    from emlens.directions.artifact import Direction
    from emlens.directions.lens import direction_tokens

    loaded = Direction.load(direction)
    fitted_on = loaded.cfg.model
    handle = load(model or fitted_on.get("model"), adapter if model else adapter or fitted_on.get("adapter"), device)
    table = direction_tokens(handle, loaded.vector(layer), top)
    typer.echo(f"{'rank':>4} {'promoted':>16} {'logit':>8} {'suppressed':>16} {'logit':>8}")
    for row in table.itertuples(index=False):
        typer.echo(f"{row.rank:>4} {row.promoted!r:>16} {row.promoted_logit:>8.2f} {row.suppressed!r:>16} "
                   f"{row.suppressed_logit:>8.2f}")


@app.command("patch")
def patch_command(
    spec: Path = typer.Argument(..., help="patching spec (YAML: adapter, table, layers, sites, positions, method)"),
    out: Path = typer.Option(..., "--out", help="run folder (a killed run resumes: finished cells are kept)"),
    adapter: Optional[str] = typer.Option(None, "--adapter", "-a", help="the fine-tune, over the spec's adapter"),
    device: Optional[str] = DEVICE_OPT,
    progress: bool = typer.Option(True, help="progress bars"),
) -> None:
    """Where the fine-tune's behaviour lives: attribution patching over layer x site x positions, then exact
    activation patching from the adapter into its base, on misaligned / aligned answer pairs."""
    from emlens.study.patch import run_patch

    quiet_libraries()
    found = run_patch(spec, out, **given(device=device, adapter=adapter), progress=progress)
    cfg, exact = found["cfg"], found["exact"]
    if exact is not None and exact.effect.notna().any():  # a sham adapter moves nothing: no cell to name
        best = exact.loc[exact.effect.abs().idxmax()]
        typer.echo(f"strongest cell: layer {best.layer} {best.site} ({best.positions} positions) effect "
                   f"{best.effect:.3f} [{best.ci_low:.3f}, {best.ci_high:.3f}] over {best.n} pairs")
    summary = {k: cfg[k] for k in ("n_pairs", "spearman", "n_cells") if k in cfg}
    typer.echo(" ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in summary.items()))


@bench_app.command("patch")
def bench_patch_command(
    pairs: Optional[int] = typer.Option(None, "--pairs", min=1, help="prompts (each a target and an alternative)"),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help="all (the default), 15, 0-5,10"),
    sites: Optional[str] = typer.Option(None, "--sites", help="comma-separated (default: resid_pre,attn_out,mlp_out)"),
    positions: Optional[str] = typer.Option(None, "--positions", help="comma-separated (default: all)"),
    repeats: Optional[int] = typer.Option(None, "--repeats", min=1, help="interleaved runs of each phase; the best "
                                                                       "counts (default 1: a phase is the whole grid)"),
    model: Optional[str] = MODEL_OPT,
    adapter: Optional[str] = typer.Option(None, "--adapter", "-a", help="the donor (default: a random LoRA on q_proj, "
                                                                       "v_proj, written to a temporary folder)"),
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Exact activation patching vs the forward passes it needs (patch_vs_forwards) and vs attribution patching
    on the same grid (attribution_vs_patching)."""
    import tempfile

    from emlens.bench.patch import bench_patch, random_adapter
    from emlens.cli.app import model_name
    from emlens.sites import parse_layers

    quiet_libraries()  # the random adapter is written before the model loads

    def names(text: Optional[str]) -> Optional[list[str]]:
        return [part.strip() for part in text.split(",") if part.strip()] if text is not None else None

    with tempfile.TemporaryDirectory(prefix="emlens-bench-") as tmp:
        if adapter is None:
            adapter = str(random_adapter(model_name(model), Path(tmp) / "adapter"))
        handle = load(model, adapter, device)
        chosen = parse_layers(layers, handle.n_layers) if layers is not None else None
        bench_patch(handle, echo=typer.echo, **given(pairs=pairs, layers=chosen, sites=names(sites),
                                                     positions=names(positions), repeats=repeats))
