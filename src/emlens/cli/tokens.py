"""`emlens tokens RUN --direction DIR --out OUT`: each token's projection on a direction over a run's responses."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emlens.cli.app import DEVICE_OPT, app, given, quiet_libraries


@app.command("tokens")
def tokens_command(
    run: Path = typer.Argument(..., help="eval run folder (or its samples.parquet)"),
    direction: Path = typer.Option(..., "--direction", help="direction artifact folder"),
    out: Path = typer.Option(..., "--out", "-o", help="a new folder (or one this command wrote before), outside RUN"),
    layer: Optional[int] = typer.Option(None, "--layer", help="direction layer (default: its best layer)"),
    n: Optional[int] = typer.Option(None, "--n", min=1, help="responses to draw (default 4): the least and most "
                                                             "aligned where the judge scored them, else the first "
                                                             "ones with a response"),
    setting: Optional[str] = typer.Option(None, "--setting", help="rows of this setting only (e.g. free_form)"),
    adapter: Optional[str] = typer.Option(None, "--adapter", "-a",
                                          help="PEFT adapter folder or RUN@STEP (default: the run's own)"),
    force: bool = typer.Option(False, "--force", help="allow a direction fitted on another base model"),
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Token-level heat-map: each token's residual projected on a direction, over a few of a run's prompts and
    responses, into OUT/tokens.png, OUT/tokens.html (a page of its own) and OUT/tokens.parquet (one row per token)."""
    from emlens.analysis.token_heatmap import run_token_heatmap

    quiet_libraries()
    table = run_token_heatmap(run, direction, out, force=force,
                              **given(layer=layer, n=n, setting=setting, adapter=adapter, device=device))
    typer.echo(f"wrote {out}: tokens.png, tokens.html, tokens.parquet ({table.row.nunique()} responses, "
               f"{len(table)} tokens, {int(table.response.sum())} in responses)")
