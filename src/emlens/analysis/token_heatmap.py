"""Token-level projections of a direction: each token's residual at the direction's site, projected on its unit
vector, over a prompt and its response, drawn as a heat-map (a PNG for reports, a self-contained HTML page).

The projection of token t is (h_t - m) . u at `blocks.{layer}.hook_{site}`, m the midpoint of the direction's two
class means (red: the token leans to the positive side, e.g. misaligned); the colour scale is symmetric about 0 and
shared by every row, so rows compare. Each sequence's first token (the attention sink, whose residual is huge and
the same for every prompt) is shown but left out of the scale.

`run_token_heatmap` (`emlens tokens RUN --direction DIR --out OUT`) draws a few responses of any eval run: OUT gets
tokens.png, tokens.html, tokens.parquet (one row per token) and cfg.json, written whole.
"""

from __future__ import annotations

import html
import json
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib import colors

from emlens.base.io import (
    CFG_FILE,
    FORMAT_VERSION,
    SAMPLES_FILE,
    atomic_folder,
    atomic_write_json,
    atomic_write_table,
    atomic_write_text,
    check_writable_folder,
    fail,
    read_table,
    register_artifact,
    save_figure,
    versions,
)
from emlens.directions.artifact import Direction
from emlens.generation.hf_engine import capture_hf
from emlens.model import Model, load_model
from emlens.runs import read_samples
from emlens.sites import parse_site

TOKENS_KIND = "token_heatmap"  # the folder `emlens tokens` writes
TABLE_FILE = "tokens.parquet"


def token_projections(handle: Model, direction: Direction, chats: Sequence[list[dict]], responses: Sequence[str],
                      layer: int | None = None) -> pd.DataFrame:
    """One row per token of each (chat, response): row, position, token text, whether it is a response token,
    and its projection on the direction's unit vector at its site and `layer` (default: its best layer)."""
    layer = direction.best_layer if layer is None else int(layer)
    unit = direction.vector(layer).float()
    unit = unit / unit.norm()
    centre = midpoint(direction, layer, unit)
    site = parse_site(direction.site(layer), handle.n_layers)
    sequences = []
    for chat, response in zip(chats, responses, strict=True):
        prompt = handle.tokenizer(handle.chat_text(chat), add_special_tokens=False)["input_ids"]
        answer = handle.tokenizer(response, add_special_tokens=False)["input_ids"]
        sequences.append((prompt + answer, len(prompt)))
    captured = capture_hf(handle, sequences, [(site.layer, site.kind)], "all")
    rows = []
    for row, ((ids, prompt_len), found) in enumerate(zip(sequences, captured, strict=True)):
        projection = (found[site.name] @ unit - centre).tolist()
        for position, (token, value) in enumerate(zip(ids, projection, strict=True)):
            rows.append({"row": row, "position": position, "token": handle.tokenizer.decode([token]),
                         "response": position >= prompt_len, "projection": value})
    return pd.DataFrame(rows)


def midpoint(direction: Direction, layer: int, unit) -> float:
    """Where the direction's two classes meet along it (the midpoint of their means; for a regression the mean of
    its data), so that a positive projection leans to the positive class: 0 when the artifact keeps no means."""
    tensors, row = direction.tensors, direction.layers.index(layer)
    if "mean_positive" in tensors and "mean_negative" in tensors:
        return float(((tensors["mean_positive"][row] + tensors["mean_negative"][row]).float() / 2) @ unit)
    return float(tensors["mean"][row].float() @ unit) if "mean" in tensors else 0.0


def _scale(table: pd.DataFrame) -> colors.Normalize:
    values = table.projection[table.position > 0].abs()
    bound = float(values.quantile(0.98)) if len(values) else 1.0
    return colors.TwoSlopeNorm(vcenter=0.0, vmin=-bound or -1.0, vmax=bound or 1.0)


def heatmap_figure(table: pd.DataFrame, path: Path, title: str, labels: Sequence[str] = (),
                   response_only: bool = True, width: int = 110) -> Path:
    """Each row's tokens (its response only, by default) as coloured text, wrapped at `width` characters."""
    norm, cmap = _scale(table), plt.get_cmap("RdBu_r")
    lines: list[tuple[str | None, list[tuple[str, float]]]] = []
    for row, part in table.groupby("row", sort=True):
        shown = part[part.response] if response_only else part
        lines.append((labels[row] if row < len(labels) else f"row {row}", []))
        current, used = [], 0
        for token, value in zip(shown.token, shown.projection, strict=True):
            token = token.replace("\n", "⏎ ")
            if used + len(token) > width and current:
                lines.append((None, current))
                current, used = [], 0
            current.append((token, value))
            used += len(token)
        lines.append((None, current))
    fig = plt.figure(figsize=(width * 0.085, 0.3 * len(lines) + 0.9))
    ax = fig.add_axes((0.01, 0.02, 0.98, 0.96 - 0.4 / (0.3 * len(lines) + 0.9)))
    ax.set_axis_off()
    ax.set_xlim(0, width)
    ax.set_ylim(len(lines), 0)
    for y, (label, tokens) in enumerate(lines):
        if label is not None:
            ax.text(0, y + 0.6, label, fontsize=8, weight="bold", va="center")
            continue
        x = 0.0
        for token, value in tokens:
            ax.text(x, y + 0.6, token, fontsize=8, family="monospace", va="center",
                    bbox={"boxstyle": "square,pad=0.05", "fc": cmap(norm(value)), "ec": "none"})
            x += len(token)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def heatmap_html(table: pd.DataFrame, path: Path, title: str, labels: Sequence[str] = ()) -> Path:
    """A self-contained page: every token of each row (prompt greyed, response in full), coloured by its
    projection, the value on hover."""
    norm, cmap = _scale(table), plt.get_cmap("RdBu_r")
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for row, part in table.groupby("row", sort=True):
        label = labels[row] if row < len(labels) else f"row {row}"
        spans = []
        for token, value, is_response in zip(part.token, part.projection, part.response, strict=True):
            style = f"background:{colors.to_hex(cmap(norm(value)))}" + ("" if is_response else ";opacity:.55")
            spans.append(f'<span title="{value:.3f}" style="{style}">{html.escape(token)}</span>')
        parts.append(f"<h2>{html.escape(label)}</h2><p class='t'>{''.join(spans)}</p>")
    style = ("body{font-family:sans-serif;max-width:980px;margin:2em auto} .t{font-family:monospace;white-space:pre-wrap;"
             "line-height:1.7} span{padding:1px 0}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}"
            f"</style></head><body>{''.join(parts)}</body></html>\n")
    atomic_write_text(path, page)
    return path


def pick_responses(samples: pd.DataFrame, n: int = 4, setting: str = "free_form") -> pd.DataFrame:
    """Answers of `setting` (free-form by default) to show: the least and the most aligned by the judge (half each),
    without a nudge where there are such answers."""
    rows = samples[(samples.setting == setting) & samples.aligned.notna()]
    if "nudge" in rows and (rows.nudge == "none").any():
        rows = rows[rows.nudge == "none"]
    ranked = rows.sort_values("aligned", kind="stable")
    picked = pd.concat([ranked.head(n - n // 2), ranked.tail(n // 2)])
    return picked[~picked.index.duplicated()]


def describe_row(sample: pd.Series) -> str:
    question = textwrap.shorten(str(sample.get("paraphrase") or sample.get("question_id")), 70)
    return f"aligned {sample.aligned:.0f}: {question}"


@torch.inference_mode()
def response_heatmaps(handle: Model, direction: Direction, samples: pd.DataFrame, out: Path, title: str,
                      n: int = 4) -> tuple[Path, Path, pd.DataFrame]:
    """The heat-map figure and page of `n` free-form responses of an eval table, and their token table."""
    picked = pick_responses(samples, n)
    chats = [json.loads(m) if isinstance(m, str) else list(m) for m in picked.messages]
    table = token_projections(handle, direction, chats, [str(r) for r in picked.response])
    labels = [describe_row(s) for _, s in picked.iterrows()]
    out.mkdir(parents=True, exist_ok=True)
    figure = heatmap_figure(table, out / "tokens.png", title, labels)
    page = heatmap_html(table, out / "tokens.html", title, labels)
    return figure, page, table.assign(label=[labels[r] for r in table.row])


# ---------------------------------------------------------------- any run: `emlens tokens`


def answered(samples: pd.DataFrame) -> pd.Series:
    """The rows that have a response to draw (not missing, not empty; blank lines are tokens too)."""
    return samples.response.notna() & (samples.response.astype(str) != "")


def select_responses(samples: pd.DataFrame, n: int = 4, setting: str | None = None,
                     where: object = "samples") -> pd.DataFrame:
    """The `n` rows to draw: where the judge scored `aligned` (in `setting`, default free_form), the least and
    the most aligned (`pick_responses`); otherwise the first `n` rows with a response (of `setting`, if given)."""
    if setting is not None:
        if "setting" not in samples:
            raise fail(where, f"no 'setting' column to pick setting '{setting}' from")
        if not (samples.setting == setting).any():
            known = ", ".join(sorted(samples.setting.dropna().astype(str).unique())) or "none"
            raise fail(where, f"no row of setting '{setting}' (settings: {known})")
    judged = setting or "free_form"
    if {"aligned", "setting"} <= set(samples) and samples[samples.setting == judged].aligned.notna().any():
        picked = pick_responses(samples[answered(samples)], n, judged)
    else:
        rows = samples if setting is None else samples[samples.setting == setting]
        picked = rows[answered(rows)].head(n)
    if picked.empty:
        raise fail(where, "no row with a response" + (f" of setting '{setting}'" if setting else "") +
                   " to draw")
    return picked


def row_label(sample: pd.Series) -> str:
    """A heading for one drawn row: its judged alignment where there is one, its setting and nudge, its question."""
    if pd.notna(sample.get("aligned")):
        return describe_row(sample)
    question = textwrap.shorten(str(sample.get("paraphrase") or sample.get("question_id") or ""), 70)
    where = " / ".join(str(sample[c]) for c in ("setting", "nudge") if pd.notna(sample.get(c)))
    return f"{where}: {question}" if where else question


def _chat(value, where: object) -> list[dict]:
    if not isinstance(value, str):
        return list(value)
    try:
        chat = json.loads(value)
    except json.JSONDecodeError as error:
        raise fail(where, f"column 'messages': a value is not JSON ({error.msg})") from None
    if not isinstance(chat, list):
        raise fail(where, "column 'messages': a value is not a list of chat messages")
    return chat


def run_model(picked: pd.DataFrame, where: object) -> tuple[str, str | None]:
    """The model (and adapter) that wrote the drawn rows, from the samples' `model` and `adapter` columns."""
    if "model" not in picked:
        raise fail(where, "no 'model' column: cannot tell which model wrote the responses")
    models = picked.model.dropna().astype(str).unique()
    adapters = ([a for a in picked.adapter.dropna().astype(str).unique() if a] if "adapter" in picked else [])
    if len(models) != 1 or len(adapters) > 1:
        found = ", ".join([*models, *adapters]) or "none"
        raise fail(where, f"the drawn rows come from more than one model or adapter ({found}); pick one with "
                          "--setting")
    return models[0], (adapters[0] if adapters else None)


def run_token_heatmap(run: str | Path, direction: Direction | str | Path, out: str | Path, layer: int | None = None,
                      n: int = 4, setting: str | None = None, adapter: str | None = None, device: str | None = None,
                      force: bool = False, handle: Model | None = None) -> pd.DataFrame:
    """`em.token_heatmap` / `emlens tokens`: each token's projection on `direction` (at `layer`, default its best)
    over `n` responses of an eval run (the least and most aligned where judged, else the first answered ones).

    The run's model and adapter (its samples' `model` and `adapter` columns) are loaded unless `handle` is given;
    `adapter` replaces the run's. OUT, a new folder (or one this wrote before), gets tokens.png, tokens.html,
    tokens.parquet and cfg.json, all at once. `force` allows a direction fitted on another base model. Returns the
    token table: one row per token, with the drawn sample's label, setting, nudge and question.
    """
    run, out = Path(run), Path(out)
    if not run.exists():
        raise fail(run, "no such run folder")
    if run.is_dir() and out.resolve().is_relative_to(run.resolve()):
        raise fail(out, f"inside the run folder {run}, which another command wrote; choose a folder outside it")
    samples = read_samples(run)
    where = run / SAMPLES_FILE if run.is_dir() else run
    missing = [c for c in ("messages", "response") if c not in samples]
    if missing:
        raise fail(where, f"no '{missing[0]}' column: not a table of prompts and responses")
    loaded = direction if isinstance(direction, Direction) else Direction.load(direction)
    layer = loaded.best_layer if layer is None else int(layer)
    loaded.vector(layer)  # an unknown layer fails here, naming the artifact and its layers
    picked = select_responses(samples, n, setting, where)
    chats = [_chat(m, where) for m in picked.messages]
    check_writable_folder(out, TOKENS_KIND)  # before the model is loaded
    if handle is None:
        spec, recorded = run_model(picked, where)
        handle = load_model(spec, adapter=adapter or recorded, **({"device": device} if device else {}))
    loaded.check_compatible(handle, force=force)  # width (never forceable), depth, base model
    with torch.inference_mode():  # only here: a model loaded under it could not be trained or steered later
        table = token_projections(handle, loaded, chats, [str(r) for r in picked.response], layer)
    labels = [row_label(s) for _, s in picked.iterrows()]
    keep = [c for c in ("setting", "nudge", "question_id", "paraphrase_index", "sample_index", "aligned")
            if c in picked]
    details = picked[keep].reset_index(drop=True).assign(label=labels)
    table = table.join(details, on="row")
    title = f"{loaded.name} direction (layer {layer}, {loaded.site_kind}) on {run.name}"
    manifest = {"kind": TOKENS_KIND, "format_version": FORMAT_VERSION, "run": str(run),
                "direction": str(loaded.path or loaded.name), "direction_name": loaded.name, "layer": layer,
                "site": loaded.site(layer), "setting": setting, "n": n, "rows": len(picked), "tokens": len(table),
                "response_tokens": int(table.response.sum()), "model": handle.describe(), "versions": versions(),
                "created": time.time()}
    with atomic_folder(out, TOKENS_KIND) as tmp:  # written whole: a failure leaves the old folder, or none
        heatmap_figure(table, tmp / "tokens.png", title, labels)
        heatmap_html(table, tmp / "tokens.html", title, labels)
        atomic_write_table(table, tmp / TABLE_FILE)
        atomic_write_json(tmp / CFG_FILE, manifest)
    return table


@register_artifact(TOKENS_KIND, whole=True)
def open_token_heatmap(folder: str | Path) -> pd.DataFrame:
    """`em.load(OUT)` of `emlens tokens`: its token table."""
    return read_table(Path(folder) / TABLE_FILE)


__all__ = ["heatmap_figure", "heatmap_html", "pick_responses", "response_heatmaps", "run_token_heatmap",
           "select_responses", "token_projections"]
