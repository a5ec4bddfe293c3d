"""Token-level projections of a direction: each token's residual at the direction's site, projected on its unit
vector, over a prompt and its response, drawn as a heat-map (a PNG for reports, a self-contained HTML page).

The projection of token t is (h_t - m) . u at `blocks.{layer}.hook_{site}`, m the midpoint of the direction's two
class means (red: the token leans to the positive side, e.g. misaligned); the colour scale is symmetric about 0 and
shared by every row, so rows compare. Each sequence's first token (the attention sink, whose residual is huge and
the same for every prompt) is shown but left out of the scale.
"""

from __future__ import annotations

import html
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib import colors

from emlens.base.io import atomic_write_text, save_figure
from emlens.directions.artifact import Direction
from emlens.generation.hf_engine import capture_hf
from emlens.model import Model
from emlens.sites import parse_site


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


def pick_responses(samples: pd.DataFrame, n: int = 4) -> pd.DataFrame:
    """Free-form answers to show: the least and the most aligned by the judge (half each), without a nudge where
    there are such answers."""
    rows = samples[(samples.setting == "free_form") & samples.aligned.notna()]
    rows = rows[rows.nudge == "none"] if (rows.nudge == "none").any() else rows
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


__all__ = ["heatmap_figure", "heatmap_html", "response_heatmaps", "token_projections"]
