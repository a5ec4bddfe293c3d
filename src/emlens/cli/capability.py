"""`emlens capability` and `emlens bench capability`: MC accuracy by option log-likelihood, GSM8K exact match."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emlens.cli.app import ADAPTER_OPT, DEVICE_OPT, ENGINE_OPT, MODEL_OPT, TP_OPT, app, bench_app, config_option, load
from emlens.evaluation.capability_tasks import CapabilityConfig


@app.command("capability")
def capability_command(
    out: Path = typer.Option(..., "--out", "-o", help="run folder (re-run the same command to resume)"),
    config_file: Optional[Path] = typer.Option(None, "--config", help="YAML CapabilityConfig; a flag below "
                                                                      "overrides its field"),
    tasks: Optional[str] = config_option(CapabilityConfig, "tasks", "--tasks", help="comma-separated: mc, gsm8k"),
    mc: Optional[str] = config_option(CapabilityConfig, "mc", "--mc", help="bundled MC set (mmlu-pro) or an MC file: JSONL / JSON / "
                                                        "CSV with question, options (or A, B, ... columns), answer"),
    gsm8k: Optional[str] = config_option(CapabilityConfig, "gsm8k", "--gsm8k", help="GSM8K file (Alpaca or GSM8K records), or 'shared': "
                                                              "benign/gsm8k_train_alpaca_format.json in shared/data"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="first N questions of each task "
                                                                     "(else --mc-limit, --gsm8k-limit)"),
    mc_limit: Optional[int] = config_option(CapabilityConfig, "mc_limit", "--mc-limit", min=1),
    gsm8k_limit: Optional[int] = config_option(CapabilityConfig, "gsm8k_limit", "--gsm8k-limit", min=1),
    full: bool = typer.Option(False, "--full", help="every MC question and the whole held-out GSM8K slice"),
    mc_format: Optional[str] = config_option(CapabilityConfig, "mc_format", "--mc-format", help="letters (score each option's "
                                                                      "letter) or cloze (score the option texts)"),
    shots: Optional[int] = config_option(CapabilityConfig, "mc_shots", "--shots", min=0, help="worked MC examples before each question"),
    shots_from: Optional[str] = config_option(CapabilityConfig, "mc_shots_from", "--shots-from", help="MC set the worked examples come from "
                                                                        "(none: mmlu-pro's own, else the MC "
                                                                        "file's first questions)"),
    gsm8k_holdout: Optional[int] = config_option(CapabilityConfig, "gsm8k_holdout", "--gsm8k-holdout", min=1,
                                                help="size of the held-out slice at the end of training's seeded "
                                                     "order"),
    split_seed: Optional[int] = config_option(CapabilityConfig, "split_seed", "--split-seed", help="the training seed whose benign order "
                                                                        "the GSM8K slice is held out from"),
    max_new_tokens: Optional[int] = config_option(CapabilityConfig, "max_new_tokens", "--max-new-tokens", min=1, help="GSM8K answer length"),
    batch_size: Optional[int] = config_option(CapabilityConfig, "batch_size", "--batch-size", min=1),
    model: Optional[str] = MODEL_OPT, adapter: Optional[str] = ADAPTER_OPT, device: Optional[str] = DEVICE_OPT,
    engine: Optional[str] = ENGINE_OPT, tensor_parallel_size: Optional[int] = TP_OPT,
) -> None:
    """Multiple-choice accuracy by option log-likelihood and GSM8K exact match (on problems mixture training
    never draws) into OUT/samples.parquet; accuracy with n and 95 % CI per task."""
    from emlens.evaluation.capability import format_summary, load_capability_data, run_capability
    from emlens.evaluation.capability_tasks import build_capability_config

    every = {"mc_limit": None, "gsm8k_limit": None} if full else {}
    config = build_capability_config(
        config_file, tasks=tasks.split(",") if tasks else None, mc=mc, gsm8k=gsm8k, mc_format=mc_format,
        mc_shots=shots, mc_shots_from=shots_from, mc_limit=mc_limit or limit, gsm8k_limit=gsm8k_limit or limit,
        gsm8k_holdout=gsm8k_holdout,
        split_seed=split_seed, max_new_tokens=max_new_tokens, batch_size=batch_size, engine=engine)
    if every:
        config = config.model_copy(update=every)
    data = load_capability_data(config)  # a bad file fails before the model loads
    handle = load(model, adapter, device, tensor_parallel_size=tensor_parallel_size)
    result = run_capability(handle, config, out, data=data)
    typer.echo(f"wrote {out / 'samples.parquet'}: {len(result.rows)} questions "
               f"({handle.spec}{', adapter ' + str(adapter) if adapter else ''})")
    for line in format_summary(result.summary):
        typer.echo(line)


@bench_app.command("capability")
def bench_capability_command(
    questions: int = typer.Option(32, "--questions", min=1, help="bundled MMLU-Pro questions"),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    answer_tokens: int = typer.Option(16, "--answer-tokens", min=1,
                                      help="cap of the generate-the-answer baseline (vs_generate_answer)"),
    repeats: int = typer.Option(2, "--repeats", min=1, help="interleaved runs of each; the best counts"),
    shots: Optional[int] = config_option(CapabilityConfig, "mc_shots", "--shots", min=0, help="worked examples before each question "
                                                                      "(a capability run's)"),
    model: Optional[str] = MODEL_OPT, device: Optional[str] = DEVICE_OPT,
) -> None:
    """Questions/s of option log-likelihood scoring against generating the answer letter (vs_generate) and the
    answer (vs_generate_answer) per question; last line key=value pairs."""
    from emlens.bench.capability import bench_capability

    handle = load(model, None, device)
    bench_capability(handle, questions, batch_size, answer_tokens, repeats, shots, echo=typer.echo)
