"""`emlens sae train | eval | decompose | diff`: sparse autoencoders (sae-lens) on emlens's activations."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emlens.cli.app import ADAPTER_OPT, DEVICE_OPT, MODEL_OPT, app, bench_app, load

sae_app = typer.Typer(help="Sparse autoencoders (sae-lens): train, eval, decompose a direction, diff checkpoints.",
                      no_args_is_help=True)
app.add_typer(sae_app, name="sae")
SAE_ARG = typer.Argument(..., help="SAE: an `emlens sae train` folder, a sae-lens folder, or RELEASE:SAE_ID of the "
                                   "sae-lens registry (online)")
LABELS_OPT = typer.Option(None, "--labels", help="an `emlens sae explain` folder of this SAE: its explanations "
                                                 "become a `label` column of the tables")


def _figures(values: dict) -> str:
    return " ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in values.items()
                    if not isinstance(v, dict))


@sae_app.command("train")
def sae_train_command(
    config: Path = typer.Argument(..., help="YAML SAETrainConfig (store, site, architecture, k, tokens, ...)"),
    out: Path = typer.Option(..., "--out", "-o", help="SAE artifact folder (re-run the same command to resume)"),
) -> None:
    """Train an SAE on one site's token vectors, streamed from an activation store read at position `all`."""
    from emlens.sae.train import SAETrainConfig, train_sae

    spec = SAETrainConfig.from_yaml(config)
    typer.echo(f"wrote {train_sae(spec, out)}")


@sae_app.command("eval")
def sae_eval_command(
    sae: str = SAE_ARG,
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
    typer.echo(_figures(evaluate_sae(sae, store, handle, texts, tokens)))


@sae_app.command("decompose")
def sae_decompose_command(
    sae: str = SAE_ARG,
    direction: Path = typer.Option(..., "--direction", "-d", help="direction artifact (`emlens probe fit`)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    top: int = typer.Option(10, "--top", min=1, help="latents listed per statistic"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="contrast rows per side"),
    n_random: int = typer.Option(200, "--n-random", min=10, help="random directions in the control"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="for ${EMLENS_SHARED_DATA} in the spec"),
    force: bool = typer.Option(False, "--force", help="replace OUT"),
    labels: Optional[Path] = LABELS_OPT,
    model: Optional[str] = MODEL_OPT, adapter: Optional[str] = ADAPTER_OPT, device: Optional[str] = DEVICE_OPT,
) -> None:
    """A direction in SAE latents: decoder cosines and attribution on its contrast data, each beside random
    directions, and the top latents' most-activating contexts. Default model: the direction's own."""
    from emlens.base.io import check_writable_folder
    from emlens.directions.artifact import Direction
    from emlens.sae.artifact import load_sae
    from emlens.sae.decompose import DECOMPOSITION_KIND, decompose_direction, save_decomposition
    from emlens.sae.explain import read_labels

    check_writable_folder(out, DECOMPOSITION_KIND, force)
    loaded = load_sae(sae)
    latent_labels = read_labels(labels, loaded) if labels is not None else None
    found = Direction.load(direction)
    handle = load(model or found.cfg.model.get("model"), adapter or found.cfg.model.get("adapter"), device)
    found.check_compatible(handle)
    result = decompose_direction(loaded, found, handle, top, limit=limit, data_root=data_root,
                                 n_random=n_random, progress=True, latent_labels=latent_labels)
    save_decomposition(result, out, force)
    for name in ("cosine", "attribution"):
        typer.echo(f"{name}: {_figures(result.summary[name])}")
    typer.echo(f"top latents by cosine: {', '.join(f'{r.latent} ({r.cosine:+.3f})' for r in result.cosine.head(5).itertuples())}")
    typer.echo(f"top latents by attribution: "
               f"{', '.join(f'{r.latent} ({r.share:+.3f})' for r in result.attribution.head(5).itertuples())}")
    typer.echo(f"wrote {out}")


@sae_app.command("diff")
def sae_diff_command(
    sae: str = SAE_ARG,
    adapters: list[str] = typer.Option(..., "--adapter", "-a", help="repeatable: fine-tunes (or RUN@STEP "
                                                                     "checkpoints) compared with the base model"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    questions: str = typer.Option("betley-first-plot", "--questions", "-q", help="prompts: a question set"),
    table: Optional[Path] = typer.Option(None, "--table", help="prompts and responses of an eval run instead"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="first N prompts"),
    max_response_tokens: int = typer.Option(64, "--max-response-tokens", min=1),
    top: int = typer.Option(20, "--top", min=1, help="latents listed per model"),
    force: bool = typer.Option(False, "--force", help="replace OUT"),
    labels: Optional[Path] = LABELS_OPT,
    model: Optional[str] = MODEL_OPT, device: Optional[str] = DEVICE_OPT,
) -> None:
    """Model diffing: the latents whose mean activation on the same prompts changes most from the base model to
    each adapter, with bootstrap CIs and a sign-flip null, and their top contexts."""
    from emlens.base.io import check_writable_folder
    from emlens.capture.items import items_from_questions, items_from_run_table
    from emlens.runs import read_rows
    from emlens.sae.artifact import load_sae
    from emlens.sae.diff import DIFF_KIND, diff_models, save_diff
    from emlens.sae.explain import read_labels

    check_writable_folder(out, DIFF_KIND, force)
    loaded = load_sae(sae)
    latent_labels = read_labels(labels, loaded) if labels is not None else None
    items = (items_from_run_table(read_rows(table)) if table is not None
             else items_from_questions(questions))[:limit]
    models = {"base": load(model, None, device)}
    for adapter in adapters:
        models[adapter] = load(model, adapter, device)
    result = diff_models(loaded, models, items, top, max_response_tokens=max_response_tokens, progress=True,
                         latent_labels=latent_labels)
    save_diff(result, out, force)
    for name, figures in result.summary["models"].items():
        part = result.table[result.table.model == name].head(5)
        typer.echo(f"{name}: {_figures(figures)}; top: " + ", ".join(
            f"{r.latent} {r.change:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]" for r in part.itertuples()))
    typer.echo(f"wrote {out}")


@bench_app.command("sae")
def bench_sae_command(
    tokens: int = typer.Option(100_000, "--tokens", min=1024, help="tokens trained per run"),
    store_tokens: int = typer.Option(200_000, "--store-tokens", min=1024, help="tokens in the 1x store"),
    d_model: int = typer.Option(576, "--d-model", min=8, help="width (576: the embedded model)"),
    repeats: int = typer.Option(2, "--repeats", min=1),
) -> None:
    """SAE training tokens/s against sae-lens's own loop fed from memory (vs_saelens), and peak memory on a
    store 4x larger (memory_4x_vs_1x)."""
    from emlens.bench.sae import bench_sae

    bench_sae(tokens, store_tokens, d_model, repeats=repeats, echo=typer.echo)


@sae_app.command("explain")
def sae_explain_command(
    sae: str = SAE_ARG,
    latents: str = typer.Option(..., "--latents", "-l", help="latent ids (12,40,7), or an `emlens sae diff` / "
                                                             "`sae decompose` folder: its --top latents"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    explainer: str = typer.Option(..., "--explainer", help="openai:MODEL (an OpenAI-compatible endpoint), "
                                                            "hf:SPEC or vllm:SPEC (a local model)"),
    scorer: Optional[str] = typer.Option(None, "--scorer", help="the same forms (default: the explainer's model)"),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="endpoint of openai: models (default: "
                                                                    "EMLENS_JUDGE_BASE_URL, OPENAI_BASE_URL, OpenAI)"),
    texts: Optional[list[Path]] = typer.Option(None, "--texts", help="repeatable: .csv (question, answer), .json "
                                                                     "(Alpaca), .jsonl (chats) or .txt; default: "
                                                                     "judged answers and Alpaca from the shared data"),
    top: int = typer.Option(5, "--top", min=1, help="latents taken from a diff / decompose folder"),
    limit: int = typer.Option(200, "--limit", min=1, help="texts drawn per file"),
    window: int = typer.Option(32, "--window", min=4, help="tokens per context window"),
    n_test: int = typer.Option(10, "--n-test", min=1, help="held-out activating windows scored per latent"),
    per_prompt: int = typer.Option(5, "--per-prompt", min=1, help="windows per scorer request"),
    explainer_tokens: int = typer.Option(160, "--explainer-tokens", min=1, help="most tokens an explanation may "
                                                                                "take (more for reasoning models)"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="answers cached with the judge's (re-runs resume)"),
    force: bool = typer.Option(False, "--force", help="replace OUT"),
    model: Optional[str] = MODEL_OPT, adapter: Optional[str] = ADAPTER_OPT, device: Optional[str] = DEVICE_OPT,
) -> None:
    """Autointerp: an explainer writes what each latent means from its top-activating and silent windows, and a
    scorer tests it on held-out windows by detection (balanced accuracy) and fuzzing (accuracy), with 95 % CIs.
    An answer without an explanation or a parsable label list is a failure, printed and counted, never a score."""
    from emlens.base.io import check_writable_folder
    from emlens.judges.base import default_cache
    from emlens.sae.artifact import load_sae
    from emlens.sae.explain import (
        EXPLANATIONS_KIND,
        ExplainConfig,
        explain_latents,
        ranked_latents,
        save_explanations,
        scorer_tokens,
    )
    from emlens.sae.text_models import make_text_model

    check_writable_folder(out, EXPLANATIONS_KIND, force)
    config = ExplainConfig(window=window, n_test=n_test, per_prompt=per_prompt, limit=limit)
    loaded = load_sae(sae)
    handle = load(model or (loaded.cfg.get("model") or {}).get("model"), adapter, device)
    chosen = ranked_latents(latents, loaded, loaded.check_fits(handle).name, top)
    store = default_cache() if cache else None
    reader = make_text_model(explainer, store, explainer_tokens, base_url, device or "auto", handle)
    judge = make_text_model(scorer or explainer, store, scorer_tokens(per_prompt), base_url, device or "auto", handle)
    result = explain_latents(loaded, handle, chosen, reader, judge, texts, config, progress=True)
    save_explanations(result, out, force)
    for failure in result.failures.itertuples():
        typer.echo(f"failed: latent {failure.latent} {failure.stage}: {failure.reason}"
                   + (f": {failure.answer!r}" if failure.answer else ""))
    for row in result.scores.itertuples():
        typer.echo(f"latent {row.latent}: {row.explanation!r} ({row.status}); " + "; ".join(
            f"{task} {getattr(row, task):.3f} [{getattr(row, f'{task}_ci_low'):.3f}, "
            f"{getattr(row, f'{task}_ci_high'):.3f}] n={getattr(row, f'{task}_n')}" for task in ("detection", "fuzzing"))
            + f"; n_failed={row.n_failed}")
    typer.echo(f"wrote {out}")
