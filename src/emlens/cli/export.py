"""`emlens export DIR --format gguf|repeng|steering-vectors|neuronpedia --out FILE`: steer with a direction elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emlens.cli.app import app, given

FORMAT_HELP = ("gguf (llama.cpp control vector: llama-server --control-vector FILE), repeng (the same GGUF layout: "
               "ControlVector.import_gguf), steering-vectors (safetensors: read_steering_vector), neuronpedia (JSON)")


@app.command("export")
def export_command(
    direction: Path = typer.Argument(..., help="direction or probe folder"),
    fmt: str = typer.Option(..., "--format", "-f", help=FORMAT_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="file to write (replaced atomically)"),
    layer: Optional[int] = typer.Option(None, "--layer", help="its layer to export (default: its best layer)"),
    scale: Optional[float] = typer.Option(None, "--scale", help="in the units of emlens steer: the file adds what "
                                                                 "`direction.add(scale)` adds (default 1)"),
    absolute: bool = typer.Option(False, "--absolute", help="scale is the added vector's norm, not a multiple of "
                                                            "the direction's natural norm"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="target model: embedded name, HF id, folder or "
                                                                    ".gguf (default: the one it was fitted on)"),
    force: bool = typer.Option(False, "--force", help="export for another base model than it was fitted on"),
) -> None:
    """Write a direction as a steering vector other tools load: the vector emlens steer adds at that scale."""
    from emlens.cli.app import quiet_libraries
    from emlens.directions.export import export_direction

    quiet_libraries()
    written = export_direction(direction, fmt, out, absolute=absolute, force=force,
                               **given(layer=layer, scale=scale, model=model))
    typer.echo(f"wrote {written}")
