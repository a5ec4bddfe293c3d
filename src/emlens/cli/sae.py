"""`emlens sae train CONFIG.yaml --out DIR`, `emlens sae eval DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emlens.cli.app import ADAPTER_OPT, DEVICE_OPT, MODEL_OPT, app, load

sae_app = typer.Typer(help="Sparse autoencoders (sae-lens) on activation stores: train, eval.", no_args_is_help=True)
app.add_typer(sae_app, name="sae")


@sae_app.command("train")
def sae_train_command(
    config: Path = typer.Argument(..., help="YAML SAETrainConfig (store, site, architecture, k, tokens, ...)"),
    out: Path = typer.Option(..., "--out", "-o", help="SAE artifact folder"),
) -> None:
    """Train an SAE on one site's token vectors, streamed from an activation store read at position `all`."""
    from emlens.base.io import load_yaml_model
    from emlens.sae.train import SAETrainConfig, train_sae

    spec = load_yaml_model(SAETrainConfig, config)
    typer.echo(f"wrote {train_sae(spec, out)}")


@sae_app.command("eval")
def sae_eval_command(
    sae: Path = typer.Argument(..., help="SAE artifact folder"),
    store: Optional[Path] = typer.Option(None, "--store", help="store to score on (default: the training store)"),
    questions: Optional[str] = typer.Option(None, "--questions", help="with a model: texts for the spliced loss"),
    limit: int = typer.Option(16, "--limit", min=1, help="questions for the spliced loss"),
    tokens: int = typer.Option(20_000, "--tokens", min=1, help="store tokens for FVE, L0, dead and dense"),
    model: Optional[str] = MODEL_OPT, adapter: Optional[str] = ADAPTER_OPT, device: Optional[str] = DEVICE_OPT,
) -> None:
    """FVE, L0, dead / dense latents; with --questions, next-token loss spliced, clean and zero-ablated."""
    from emlens.data.questions import read_questions
    from emlens.sae.quality import evaluate_sae

    handle = texts = None
    if questions is not None:
        handle = load(model, adapter, device)
        texts = [handle.chat_text([{"role": "user", "content": q.paraphrases[0]}])
                 for q in read_questions(questions, limit=limit)]
    figures = evaluate_sae(sae, store, handle, texts, tokens)
    typer.echo(" ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in figures.items()))
