"""`emlens eval ...`, `emlens eval report ...`, `emlens judge validate ...`, `emlens judge fit ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emlens.cli.app import (
    ADAPTER_OPT,
    DEVICE_OPT,
    ENGINE_OPT,
    JUDGE_CONCURRENCY_OPT,
    JUDGE_ENGINE_OPT,
    JUDGE_MODE_OPT,
    JUDGE_MODEL_OPT,
    JUDGE_SAMPLES_OPT,
    MODEL_OPT,
    TP_OPT,
    app,
    bench_app,
    config_option,
    given,
    load,
)
from emlens.evaluation.config import EvalConfig

eval_app = typer.Typer(help="Behavioural evaluation under nudges: `emlens eval --out RUN ...`; `emlens eval report RUN...`.")
judge_app = typer.Typer(help="Judges: validate against GPT-4o-judged responses, refit the offline judge.",
                        no_args_is_help=True)
app.add_typer(eval_app, name="eval")
app.add_typer(judge_app, name="judge")


@eval_app.callback(invoke_without_command=True)
def eval_run_command(
    ctx: typer.Context,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder (re-run the same command to resume)"),
    config_file: Optional[Path] = typer.Option(None, "--config",
                                               help="YAML EvalConfig; a flag below overrides its field, a field "
                                                    "overrides the class default"),
    settings: Optional[str] = config_option(EvalConfig, "settings", "--settings",
                                            help="comma-separated subset of free_form, deception, refusal, "
                                                 "factual, harm_perception"),
    nudge: Optional[list[str]] = config_option(EvalConfig, "nudges", "--nudge", "-n", help="repeatable"),
    nudges_file: Optional[Path] = config_option(EvalConfig, "nudges_file", "--nudges",
                                                help="YAML of user-defined nudges"),
    samples: Optional[int] = config_option(EvalConfig, "samples", "--samples", "-s",
                                           help="free-form samples per paraphrase"),
    questions: Optional[str] = config_option(EvalConfig, "questions", "--questions",
                                             help="free-form (and harm-perception) question set or file"),
    limit: Optional[int] = config_option(EvalConfig, "limit", "--limit", help="first N questions of every setting "
                                         "(refusal: of each file)"),
    max_new_tokens: Optional[int] = config_option(EvalConfig, "max_new_tokens", "--max-new-tokens",
                                                  help="free-form and deception answer length"),
    judge: Optional[str] = config_option(EvalConfig, "judge", "--judge", help="default (offline), openai, hf"),
    judge_model: Optional[str] = JUDGE_MODEL_OPT,
    judge_concurrency: Optional[int] = JUDGE_CONCURRENCY_OPT,
    judge_mode: Optional[str] = JUDGE_MODE_OPT,
    judge_samples: Optional[int] = JUDGE_SAMPLES_OPT,
    judge_engine: Optional[str] = JUDGE_ENGINE_OPT,
    batch_size: Optional[int] = config_option(EvalConfig, "batch_size", "--batch-size"),
    seed: Optional[int] = config_option(EvalConfig, "seed", "--seed"),
    model: Optional[str] = MODEL_OPT, adapter: Optional[str] = ADAPTER_OPT, device: Optional[str] = DEVICE_OPT,
    engine: Optional[str] = ENGINE_OPT, tensor_parallel_size: Optional[int] = TP_OPT,
) -> None:
    """Run the settings under the nudges into OUT/samples.parquet, judged and labelled."""
    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        raise typer.BadParameter("--out is required", param_hint="--out")
    from emlens.analysis.report import print_summary
    from emlens.evaluation.config import build_eval_config
    from emlens.evaluation.run import run_eval
    from emlens.judges import make_judge

    config = build_eval_config(config_file, settings=settings, nudges=nudge, nudges_file=nudges_file,
                               samples=samples, questions=questions, limit=limit, max_new_tokens=max_new_tokens,
                               judge=judge, judge_model=judge_model, batch_size=batch_size, seed=seed,
                               engine=engine, judge_concurrency=judge_concurrency, judge_mode=judge_mode,
                               judge_samples=judge_samples, judge_engine=judge_engine)
    judge_obj = make_judge(config.judge, config.judge_model, **config.judge_options(),
                           **given(device=device))  # fails before any sampling
    handle = load(model, adapter, device, tensor_parallel_size=tensor_parallel_size)
    table = run_eval(handle, config, out, judge=judge_obj)
    typer.echo(f"wrote {out / 'samples.parquet'}: {len(table)} rows")
    print_summary(table, echo=typer.echo)


@eval_app.command("report")
def eval_report_command(
    runs: list[Path] = typer.Argument(..., help="eval run folders or samples.parquet files"),
    out: Path = typer.Option(Path("artifacts/report"), "--out", "-o", help="folder for figures and tables"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="a calibration of the runs' judge "
                                                                           "(emlens judge calibrate): rates "
                                                                           "corrected with it"),
) -> None:
    """Figures of the studies: misaligned rate, refusal rate, flip rate by nudge x model; harm vs P(misaligned).
    Misaligned rates are shown raw and corrected for the judge's error where it has a calibration."""
    from emlens.analysis.report import write_report

    written = write_report(runs, out, echo=typer.echo, calibration=calibration)
    for path in written:
        typer.echo(f"wrote {path}")


@judge_app.command("validate")
def judge_validate_command(
    data: list[Path] = typer.Option(..., "--data", help="judged CSV files or folders (question, answer, aligned, coherent)"),
    judge: Optional[str] = typer.Option(None, "--judge", help="default (offline), openai, hf"),
    judge_model: Optional[str] = typer.Option(None, "--judge-model"),
    leave_one_model_out: bool = typer.Option(False, "--leave-one-model-out",
                                             help="refit the offline judge on all but one model at a time"),
    leave_one_family_out: bool = typer.Option(False, "--leave-one-family-out",
                                              help="refit it on all but one family (code, medical, base) at a time"),
    limit: Optional[int] = typer.Option(None, "--limit", help="rows per file (LLM judges are slow)"),
    features_cache: Optional[Path] = typer.Option(None, "--features-cache",
                                                  help=".npy of the responses' embeddings: reused if present, else written"),
    per_model: bool = typer.Option(False, "--per-model", help="per model: reference, raw and corrected rate"),
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Spearman with GPT-4o `aligned` and AUROC for the misaligned label; last line key=value pairs. With
    --per-model: each model's reference, raw and corrected rate (calibrated on the other models)."""
    from emlens.judges.fit import validate

    options = given(judge=judge, judge_model=judge_model, limit=limit, device=device, features_cache=features_cache)
    if per_model:
        from emlens.judges.calibration import build_calibration
        from emlens.judges.fit import data_hash, scored_out_of_sample

        scored, identity, how = scored_out_of_sample(data, echo=typer.echo, **options)
        _echo_validation(build_calibration(scored, identity, data_hash(scored), how), scored)
        return
    validate(data, leave_one_model_out=leave_one_model_out, leave_one_family_out=leave_one_family_out,
             echo=typer.echo, **options)


def _echo_validation(calibration, scored) -> None:
    from emlens.judges.calibration import validate_calibration, validation_summary

    table = validate_calibration(calibration, scored)
    typer.echo(f"{'model':<50} {'n':>5} {'reference':>9} {'raw':>6} {'corrected [95% CI]':>24} {'R-G':>6}")
    for row in table.to_dict("records"):
        typer.echo(f"{row['model']:<50} {row['n']:>5} {row['reference_rate']:>9.3f} {row['raw_rate']:>6.3f} "
                   f"{row['corrected']:>7.3f} [{row['corrected_ci_low']:.3f}, {row['corrected_ci_high']:.3f}] "
                   f"{row['rogan_gladen']:>6.3f}{'' if row['covered'] else '  (reference outside)'}")
    correction = calibration.score_correction
    if correction is not None:
        sds = correction.get("transfer_sd_by_method", {calibration.correction_method: correction["transfer_sd"]})
        typer.echo(f"corrected by the {calibration.correction_method} ({correction['score']}; transfer error sd on "
                   f"the square-root scale: {', '.join(f'{m} {sd:.4f}' for m, sd in sds.items())}, the smaller "
                   f"chosen); R-G: Rogan-Gladen")
    pooled = calibration.cfg["pooled"]
    typer.echo(f"pooled: sensitivity {pooled['sensitivity']:.3f} [{pooled['sensitivity_ci'][0]:.3f}, "
               f"{pooled['sensitivity_ci'][1]:.3f}] specificity {pooled['specificity']:.3f} "
               f"[{pooled['specificity_ci'][0]:.3f}, {pooled['specificity_ci'][1]:.3f}] ({calibration.cfg['predictions']})")
    typer.echo(" ".join(f"{k}={v}" for k, v in validation_summary(table, scored).items()))


@judge_app.command("calibrate")
def judge_calibrate_command(
    data: list[Path] = typer.Option(..., "--data", help="judged CSV files or folders (question, answer, aligned, "
                                                        "coherent: the reference scores)"),
    out: Path = typer.Option(..., "--out", "-o", help="calibration folder (cfg.json; em.load opens it)"),
    judge: str = typer.Option("default", "--judge", help="default (offline), openai, hf"),
    judge_model: Optional[str] = typer.Option(None, "--judge-model"),
    limit: Optional[int] = typer.Option(None, "--limit", help="rows per file"),
    features_cache: Optional[Path] = typer.Option(None, "--features-cache",
                                                  help=".npy of the responses' embeddings: reused if present, else written"),
    force: bool = typer.Option(False, "--force", help="replace a folder that is not a calibration"),
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Calibrate a judge to the reference labels: per model its misaligned label's errors (out of sample),
    pooled sensitivity / specificity with CIs, isotonic score maps; prints the per-model validation."""
    from emlens.judges.fit import calibrate

    calibration, scored = calibrate(data, out, judge, echo=typer.echo, force=force,
                                    **given(judge_model=judge_model, limit=limit, device=device,
                                            features_cache=features_cache))
    _echo_validation(calibration, scored)
    typer.echo(f"wrote {out}")


@judge_app.command("fit")
def judge_fit_command(
    data: list[Path] = typer.Option(..., "--data", help="judged CSV files or folders"),
    out: Path = typer.Option(..., "--out", help="folder for weights.safetensors + cfg.json"),
    features_cache: Optional[Path] = typer.Option(None, "--features-cache",
                                                  help=".npy of the responses' embeddings: reused if present, else written"),
) -> None:
    """Refit the offline default judge (the shipped one was made with --data ../shared/data/judged)."""
    from emlens.judges.fit import fit_default_judge

    path = fit_default_judge(data, out, features_cache=features_cache, echo=typer.echo)
    typer.echo(f"wrote {path}")


def _openai_judge(run: Path, judge_model: Optional[str], concurrency: Optional[int] = None):
    """The run's openai judge (its model unless --judge-model), with the shared cache."""
    from emlens.base.io import read_json
    from emlens.judges import DEFAULT_OPENAI_MODEL, make_judge

    config = read_json(run / "cfg.json").get("config", {}) if (run / "cfg.json").exists() else {}
    model = judge_model or (config.get("judge_model") if config.get("judge") == "openai" else None)
    return make_judge("openai", model or DEFAULT_OPENAI_MODEL, preflight=False,  # batch files need no endpoint
                      **given(concurrency=concurrency))


@judge_app.command("export")
def judge_export_command(
    run: Path = typer.Argument(..., help="eval run folder"),
    out: Path = typer.Option(..., "--out", "-o", help="requests JSONL (OpenAI Batch API layout)"),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="default: the run's openai judge model, "
                                                                         "else gpt-4o-2024-08-06"),
) -> None:
    """Write the run's judge requests that are not cached yet as a batch file (custom_id = cache key); the same
    file runs with `vllm run-batch` for a local judge model."""
    from emlens.evaluation.rejudge import export_requests

    written, cached = export_requests(run, _openai_judge(run, judge_model), out)
    typer.echo(f"wrote {out}: {written} requests ({cached} already cached)")


@judge_app.command("import")
def judge_import_command(
    run: Path = typer.Argument(..., help="eval run folder"),
    results: Path = typer.Argument(..., help="batch result JSONL"),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="as given to `emlens judge export`"),
) -> None:
    """Read a batch result file into the judge cache (bad lines reported, valid ones kept); label the run's table
    once every judgement it needs is cached."""
    from emlens.evaluation.rejudge import import_results

    outcome = import_results(run, _openai_judge(run, judge_model), results, echo=typer.echo)
    state = "table labelled" if outcome["labelled"] else f"{outcome['missing']} judgements still missing"
    typer.echo(f"imported {outcome['stored']} results ({outcome['problems']} lines skipped); {state}")


@judge_app.command("compare")
def judge_compare_command(
    run: Path = typer.Argument(..., help="eval run folder"),
    judges: str = typer.Option(..., "--judges", help="comma-separated: default, hf:SPEC, openai:MODEL, "
                                                    "openai.sampled:MODEL, openai.verbal:MODEL"),
    judge_samples: Optional[int] = JUDGE_SAMPLES_OPT,
    judge_engine: Optional[str] = JUDGE_ENGINE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Score one table with several judges: per judge the misaligned rate (CI); per pair Spearman of aligned and
    Cohen's kappa of the misaligned label. Written to RUN/judge_compare.json (the eval report shows it)."""
    from emlens.evaluation.rejudge import compare_judges, require_run, write_comparison
    from emlens.judges import make_judge, parse_judges
    from emlens.judges.preflight import preflight_judges

    require_run(run)  # before any judge model is resolved or loaded
    specs = parse_judges(judges)
    preflight_judges(specs)  # every judge checked before the first one is built
    chosen = {f"{kind}:{model}" if model else kind:
              make_judge(kind, model, preflight=False,
                         **given(device=device, samples=judge_samples, engine=judge_engine))
              for kind, model in specs}
    rates, pairs = compare_judges(run, chosen)
    for row in rates.to_dict("records"):
        corrected = (f" corrected {row['corrected']:.3f} [{row['corrected_ci_low']:.3f}, "
                     f"{row['corrected_ci_high']:.3f}]" if row["calibration"] else " (judge not calibrated)")
        typer.echo(f"{row['judge']:<28} misaligned {row['rate']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] "
                   f"n={row['n']}{corrected}")
    for row in pairs.to_dict("records"):
        typer.echo(f"{row['judge_a']} vs {row['judge_b']}: spearman_aligned={row['spearman_aligned']:.3f} "
                   f"(n={row['spearman_n']}) kappa_misaligned={row['kappa_misaligned']:.3f}")
    typer.echo(f"wrote {write_comparison(run, rates, pairs)}")


@bench_app.command("judge")
def bench_judge_command(
    base_url: Optional[str] = typer.Option(None, "--base-url", help="an OpenAI-compatible server (default: start "
                                                                    "the embedded model behind llama.cpp's)"),
    n: int = typer.Option(64, "--n", min=1, help="judgements per measurement"),
    concurrency: int = typer.Option(16, "--concurrency", min=2),
    judge_model: str = typer.Option("smollm2", "--judge-model"),
    server: str = typer.Option("llama", "--server", help="without --base-url, start this server: llama (one slot) "
                                                         "or vllm (continuous batching)"),
    mode: Optional[str] = typer.Option(None, "--mode", help="also time this openai judge mode (sampled, verbal) "
                                                            "at the same concurrency: its cost per answer"),
    judge_samples: int = typer.Option(5, "--judge-samples", min=1, help="answers per prompt in the sampled mode"),
) -> None:
    """Judgements per second at concurrency 1 and N (and in another mode); the last line is key=value."""
    from emlens.bench.judge import bench_judge

    bench_judge(base_url, n, concurrency, judge_model, server, echo=typer.echo, mode=mode, samples=judge_samples)


@bench_app.command("hf-judge")
def bench_hf_judge_command(
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="HF model spec (default: the embedded "
                                                                          "model)"),
    n: int = typer.Option(32, "--n", min=1, help="judgements per engine"),
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """The hf judge on the hf engine (exact, one prompt at a time) and on vLLM (top-20, batched): judgements per
    second and their ratio; the last line is key=value."""
    from emlens.bench.judge import bench_hf_judge

    bench_hf_judge(**given(model=judge_model, n=n, device=device), echo=typer.echo)
