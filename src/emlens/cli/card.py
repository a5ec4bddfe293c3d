"""`emlens card DIR [--with DIR ...] [--sae SAE] [--labels DIR] [--steer RUN] --out OUT`: a direction's card."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emlens.cli.app import app


@app.command("card")
def card_command(
    direction: Path = typer.Argument(..., help="direction or probe artifact folder"),
    out: Path = typer.Option(..., "--out", "-o", help="a new folder (or a card this command wrote before)"),
    others: Optional[list[Path]] = typer.Option(None, "--with", help="another direction to compare with (same "
                                                                     "model, or the same direction on another "
                                                                     "checkpoint); repeat for several"),
    sae: Optional[str] = typer.Option(None, "--sae", help="SAE folder or RELEASE:SAE_ID: the direction's top latents"),
    labels: Optional[Path] = typer.Option(None, "--labels", help="`emlens sae explain` folder: the latents' labels"),
    steer: Optional[Path] = typer.Option(None, "--steer", help="`emlens steer` run of this direction"),
    top: int = typer.Option(10, "--top", min=1, help="SAE latents to show"),
    force: bool = typer.Option(False, "--force", help="compare with directions fitted on another base model"),
) -> None:
    """A direction card: how it was fitted, held-out metric by layer with CIs beside the shuffled-label null,
    logit-lens tokens, top SAE latents, cosines to other directions beside random, and the steering effect;
    OUT/card.md, card.html (self-contained), card.json, card.png."""
    from emlens.analysis.card import direction_card

    card = direction_card(direction, out, others or (), sae=sae, labels=labels, steer=steer, top=top, force=force)
    written = ", ".join(sorted(p.name for p in Path(out).iterdir() if p.name != "cfg.json"))
    typer.echo(f"wrote {out}: {written} (not recorded: {', '.join(card['not_recorded']) or 'nothing'})")
