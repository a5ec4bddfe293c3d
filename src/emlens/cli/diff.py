"""`emlens diff BASE --adapter A [--adapter B ...] [--control C] [--direction DIR ...] --out DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emlens.cli.app import DEVICE_OPT, app, given, quiet_libraries


@app.command("diff")
def diff_command(
    base: str = typer.Argument(..., help="the base model: embedded name, HF id or local folder"),
    adapters: list[str] = typer.Option(..., "--adapter", "-a", help="repeatable: fine-tunes of BASE (folders or "
                                                                     "RUN@STEP)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (re-run the same command to resume)"),
    control: Optional[str] = typer.Option(None, "--control", help="a benign adapter (e.g. the secure-code LoRA): "
                                                                   "every diff also as adapter minus control"),
    directions: list[str] = typer.Option([], "--direction", help="repeatable: fitted direction artifacts the "
                                                                 "adapter's weights are compared with"),
    text: Optional[Path] = typer.Option(None, "--text", help="unrelated texts for the lens (TXT lines, JSON, JSONL, "
                                                             "CSV; default: the shared data's Alpaca instructions)"),
    table: Optional[Path] = typer.Option(None, "--table", help="judged CSV (question, answer, aligned, coherent) "
                                                               "for KL and the answer pairs (default: the shared "
                                                               "data's, as emlens patch)"),
    n_texts: Optional[int] = typer.Option(None, "--n-texts", min=2, help="texts the lens averages (default 64)"),
    k: Optional[int] = typer.Option(None, "--k", min=1, help="first tokens of each text (default 5)"),
    first_token: Optional[str] = typer.Option(None, "--first-token", help="auto (the default: left out where it is "
                                                                          "an attention sink), keep, skip"),
    rows: Optional[int] = typer.Option(None, "--rows", min=1, help="judged answers KL is read on (default 16)"),
    pairs: Optional[int] = typer.Option(None, "--pairs", min=2, help="answer pairs for the steering metric "
                                                                     "(default 8)"),
    layer: Optional[int] = typer.Option(None, "--layer", min=0, help="steer at this layer (default: each lens's "
                                                                     "largest norm relative to the stream)"),
    steer_scale: Optional[float] = typer.Option(None, "--steer-scale", help="steering norm in multiples of the "
                                                                            "lens's own (default 1)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="rows per forward pass (default 4)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Model diffing with controls: the activation-difference lens (read through the logit lens, saved as a
    direction, steered into the base), per-token KL(fine-tune || base), and the LoRA's weight norms and singular
    directions; a sham adapter (B = 0) asserted equal to the base, adapter minus control with CIs."""
    from emlens.study.diff import diff

    quiet_libraries()
    found = diff(adapters, out, model=base, control=control, directions=directions, progress=progress,
                 **given(device=device, text=str(text) if text else None, table=str(table) if table else None,
                         n_texts=n_texts, k=k, first_token=first_token, rows=rows, pairs=pairs, layer=layer,
                         steer_scale=steer_scale, batch_size=batch_size))
    sham = found["cfg"]["sham"]
    typer.echo(f"sham (B = 0): max |logit difference| {sham['max_abs_logit_diff']:.3g}, mean KL "
               f"{sham['mean_kl']:.3g}")
    summary = found["summary"]
    for row in summary.itertuples():
        ci = "" if row.ci_low != row.ci_low else f" [{row.ci_low:.4g}, {row.ci_high:.4g}]"  # NaN: no CI
        where = "" if row.layer != row.layer or row.layer is None else f" @ layer {int(row.layer)}"
        typer.echo(f"{row.adapter:<28} {row.role:<14} {row.quantity:<26} {row.value:.4g}{ci}{where}")
    typer.echo(f"wrote {out} (report.md, diff.png; steer with a lens: see report.md)")
