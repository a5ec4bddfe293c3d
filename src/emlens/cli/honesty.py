"""`emlens honesty`: honesty under pressure (MASK-style) with the deception rate, and the Betley deception sets
beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emlens.cli.app import (
    ADAPTER_OPT,
    DEVICE_OPT,
    ENGINE_OPT,
    JUDGE_CONCURRENCY_OPT,
    JUDGE_MODEL_OPT,
    MODEL_OPT,
    TP_OPT,
    app,
    config_option,
    given,
    load,
)
from emlens.evaluation.honesty import HonestyConfig


@app.command("honesty")
def honesty_command(
    out: Path = typer.Option(..., "--out", "-o", help="run folder (re-run the same command to resume)"),
    config_file: Optional[Path] = typer.Option(None, "--config", help="YAML HonestyConfig; a flag below overrides "
                                                                      "its field, a field the class default"),
    propositions: Optional[str] = config_option(HonestyConfig, "propositions", "--propositions",
                                               help="bundled set or a YAML file"),
    mask_csv: Optional[Path] = config_option(HonestyConfig, "mask_csv", "--mask-csv", help="a MASK CSV (cais/MASK layout) instead; "
                                                                     "needs --judge hf or openai"),
    kind: Optional[list[str]] = config_option(HonestyConfig, "kinds", "--kind", help="repeatable: known_fact, provided_fact, statistic"),
    limit: Optional[int] = config_option(HonestyConfig, "limit", "--limit", min=1, help="first N propositions only"),
    nudge: Optional[list[str]] = config_option(HonestyConfig, "nudges", "--nudge", "-n", help="repeatable"),
    nudges_file: Optional[Path] = config_option(HonestyConfig, "nudges_file", "--nudges", help="YAML of user-defined nudges"),
    belief_asks: Optional[int] = config_option(HonestyConfig, "belief_asks", "--belief-asks", min=1, help="neutral asks per proposition"),
    deception: Optional[bool] = config_option(HonestyConfig, "deception", "--deception/--no-deception",
                                             help="also reason-then-answer under pressure: the deception rate"),
    betley: Optional[bool] = config_option(HonestyConfig, "betley", "--betley/--no-betley",
                                          help="also the Betley deception sets' TRUE / FALSE / UNKNOWN judgement, "
                                               "into OUT/betley"),
    betley_limit: Optional[int] = config_option(HonestyConfig, "betley_limit", "--betley-limit", min=1,
                                               help="system prompts per Betley set (20 questions each)"),
    judge: Optional[str] = config_option(HonestyConfig, "judge", "--judge", help="rule (multiple-choice only), hf, openai"),
    judge_model: Optional[str] = JUDGE_MODEL_OPT,
    judge_concurrency: Optional[int] = JUDGE_CONCURRENCY_OPT,
    batch_size: Optional[int] = config_option(HonestyConfig, "batch_size", "--batch-size"),
    seed: Optional[int] = config_option(HonestyConfig, "seed", "--seed"),
    model: Optional[str] = MODEL_OPT, adapter: Optional[str] = ADAPTER_OPT, device: Optional[str] = DEVICE_OPT,
    engine: Optional[str] = ENGINE_OPT, tensor_parallel_size: Optional[int] = TP_OPT,
) -> None:
    """Beliefs from neutral prompts, answers under pressure, judged consistent / lie / evasive: honesty = 1 - P(lie),
    evasion, belief consistency and the deception rate per nudge, each with n and 95 % CI."""
    from emlens.evaluation.honesty import build_honesty_config, check_judge_reads, load_propositions, run_honesty
    from emlens.evaluation.honesty_tables import report_lines
    from emlens.evaluation.preflight import honesty_judges
    from emlens.judges.honesty import make_honesty_judge
    from emlens.judges.preflight import preflight_judges

    config = build_honesty_config(
        config_file, propositions=propositions, mask_csv=str(mask_csv) if mask_csv else None, kinds=kind,
        limit=limit, nudges=nudge, nudges_file=str(nudges_file) if nudges_file else None, belief_asks=belief_asks,
        deception=deception, betley=betley, betley_limit=betley_limit, judge=judge, judge_model=judge_model,
        judge_concurrency=judge_concurrency, batch_size=batch_size, seed=seed, engine=engine)
    found = load_propositions(config)  # a bad file fails here, before any model is loaded
    check_judge_reads(config.judge, found, config.mask_csv or config.propositions)
    preflight_judges(honesty_judges(config))  # the Betley sets' judge too, which the run builds late
    judge_obj = make_honesty_judge(config, **given(device=device))
    handle = load(model, adapter, device, tensor_parallel_size=tensor_parallel_size)
    table = run_honesty(handle, config, out, judge=judge_obj, propositions=found)
    typer.echo(f"wrote {out / 'propositions.parquet'}: {len(table)} rows ({table.proposition_id.nunique()} "
               f"propositions x {table.nudge.nunique()} nudges)")
    for line in report_lines(out):
        typer.echo(line)
