"""Direction cards: one page per direction artifact that says what it is, what it was fitted on and how far to
trust it.

    emlens card artifacts/directions/refusal --with artifacts/directions/refusal-insecure \
        --sae artifacts/sae/l15 --labels artifacts/sae/l15-explained --steer artifacts/steer/refusal --out OUT
    card = em.direction_card("artifacts/directions/refusal", "OUT")      # card.json's content

OUT (written whole) holds card.md, card.html (self-contained: figures embedded, nothing fetched), card.json (every
number on the card), card.png (the held-out metric by layer over the shuffled-label band, drawn by the study
report's figure function) and, with --with, cosines.png (the cosine figure of `emlens compare`).

A card shows what the artifact recorded, and what follows from recorded numbers alone; what an older artifact
lacks is "not recorded", never guessed. Sections:
- fit: method, site, layers, position, the model (fingerprints), the data (n per class, prompt groups, hash,
  sources) and the spec it came from;
- held-out AUROC (R² for a regression onto a score) by layer: the value (mean over folds split by prompt), its
  SD over folds, a 95 % CI, and the same fit on shuffled labels (its mean and range). The AUROC's CI is Hanley &
  McNeil's from the layer's n per class (rows counted as independent: several rows per prompt make it too
  narrow; it shrinks to a point at AUROC 0 or 1); an R² has no CI unless the artifact recorded one;
- the logit lens: the tokens the direction promotes and suppresses, as recorded at fitting time;
- with --sae: the latents whose decoder vectors point most along the direction (|cosine|), beside the 95th
  percentile of the same rank for random directions, with each latent's label where --labels gives one;
- with --with: cosines per layer to other directions of the same model and to the same direction on other
  checkpoints, beside the 95th percentile of |cos| between random unit vectors in d_model;
- with --steer: the `emlens steer` run's effect at its largest scale, direction beside its random control with CIs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from emlens.analysis.compare import (
    artifact_names,
    check_comparable,
    cosine,
    cosine_table,
    plot_cosines,
    random_cosine_quantile,
)
from emlens.analysis.direction_figures import layer_metrics_figure, metric_of
from emlens.base.io import (
    CFG_FILE,
    FORMAT_VERSION,
    atomic_folder,
    atomic_write_json,
    atomic_write_text,
    check_writable_folder,
    fail,
    read_json,
    register_artifact,
    versions,
)
from emlens.directions.artifact import Direction
from emlens.directions.lens import token_line
from emlens.sae.artifact import load_sae
from emlens.sae.decompose import decoder_cosines
from emlens.sae.explain import read_labels
from emlens.sites import parse_site
from emlens.study.report import Block, render_html, steer_verdict
from emlens.study.steer import EXPERIMENT_KIND

CARD_KIND = "direction_card"
NOT_RECORDED = "not recorded"
CI_METHOD = {"auroc": "Hanley-McNeil, from n per class, rows taken as independent"}


# ---------------------------------------------------------------- how it was fitted


def fit_record(direction: Direction) -> dict:
    """What the artifact says about its fit (None where it says nothing)."""
    cfg = direction.cfg.model_dump()
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    spec = cfg.get("spec") or {}
    return {"name": direction.name, "kind": direction.KIND, "method": direction.method or None,
            "description": cfg.get("description") or None, "site_kind": direction.site_kind,
            "layers": direction.layers, "best_layer": direction.best_layer, "position": cfg.get("position"),
            "d_model": direction.d_model, "model": model.get("model"), "adapter": model.get("adapter"),
            "fingerprint": model.get("fingerprint"), "base_fingerprint": model.get("base_fingerprint"),
            "n": data.get("n"), "n_positive": data.get("n_positive"), "n_negative": data.get("n_negative"),
            "n_groups": data.get("n_groups"), "data_hash": data.get("hash"),
            "sources": [s.get("path") for s in data.get("sources") or []],
            "contrast": contrast_line(spec.get("contrast")), "score": spec.get("score"),
            "spec_file": cfg.get("spec_file"), "spec_sha256": cfg.get("spec_sha256"), "folds": cfg.get("folds"),
            "regularization": cfg.get("regularization"), "seed": cfg.get("seed"),
            "emlens_version": (cfg.get("versions") or {}).get("emlens") or cfg.get("emlens_version"),
            "created": cfg.get("created")}


def contrast_line(contrast: dict | None) -> str | None:
    """'positive: questions=strongreject limit=64; negative: ...' from a probe spec's contrast."""
    if not contrast:
        return None
    sides = []
    for side in ("positive", "negative"):
        sources = contrast.get(side) or []
        sources = sources if isinstance(sources, list) else [sources]
        described = [" ".join(f"{k}={v}" for k, v in source.items() if v not in (None, False, {}, [], "first"))
                     for source in sources]
        sides.append(f"{side}: {' + '.join(described)}")
    return "; ".join(sides)


# ---------------------------------------------------------------- held-out metric by layer


def metric_key(direction: Direction) -> str:
    metrics = direction.metrics()
    if not metrics.empty:
        return metric_of(metrics)
    return "r2" if direction.method == "ridge" else "auroc"


def hanley_mcneil(auroc: float, n_positive: int, n_negative: int) -> tuple[float, float]:
    """95 % CI of an AUROC from its standard error under Hanley & McNeil (1982), clipped to [0, 1]."""
    q1, q2 = auroc / (2 - auroc), 2 * auroc ** 2 / (1 + auroc)
    variance = (auroc * (1 - auroc) + (n_positive - 1) * (q1 - auroc ** 2)
                + (n_negative - 1) * (q2 - auroc ** 2)) / (n_positive * n_negative)
    half = 1.959964 * math.sqrt(max(variance, 0.0))
    return max(0.0, auroc - half), min(1.0, auroc + half)


def _number(row: dict, key: str) -> float | None:
    value = row.get(key)
    return None if value is None or not np.isfinite(float(value)) else float(value)


def layer_ci(row: dict, key: str) -> tuple[float | None, float | None, str | None]:
    """(low, high, method): a recorded CI, else the AUROC's Hanley-McNeil CI from the row's n per class."""
    low, high = _number(row, f"{key}_ci_low"), _number(row, f"{key}_ci_high")
    if low is not None and high is not None:
        return low, high, "recorded"
    value, n_pos, n_neg = _number(row, key), _number(row, "n_positive"), _number(row, "n_negative")
    if key != "auroc" or value is None or not n_pos or not n_neg:
        return None, None, None
    return (*hanley_mcneil(value, int(n_pos), int(n_neg)), CI_METHOD[key])


def layer_rows(direction: Direction) -> list[dict]:
    """One row per layer: the held-out metric, its fold SD, CI and the shuffled-label null (None: not recorded)."""
    key = metric_key(direction)
    rows = []
    for row in direction.metrics().to_dict("records"):
        low, high, method = layer_ci(row, key)
        null_high = _number(row, f"{key}_null_high")
        value = _number(row, key)
        rows.append({"layer": int(row["layer"]), key: value, "fold_sd": _number(row, f"{key}_std"),
                     "ci_low": low, "ci_high": high, "ci_method": method, "null": _number(row, f"{key}_null"),
                     "null_low": _number(row, f"{key}_null_low"), "null_high": null_high,
                     "above_null": None if value is None or null_high is None else value > null_high,
                     "n": None if _number(row, "n") is None else int(row["n"])})
    return rows


def best_record(direction: Direction, key: str) -> dict:
    best = direction.cfg.best_metrics
    return {"layer": direction.best_layer, key: _number(best, key), f"{key}_nested": _number(best, f"{key}_nested"),
            "nested_folds": best.get("nested_folds")}


# ---------------------------------------------------------------- SAE latents


def sae_site(loaded, direction: Direction, source: object):
    """The SAE's site, checked against the direction: same width, same site kind, a layer the direction has."""
    if loaded.d_in != direction.d_model:
        raise fail(source, f"SAE width {loaded.d_in} does not match the direction's d_model {direction.d_model}")
    site = parse_site(loaded.site_name, 10**6)
    if site.kind != direction.site_kind or site.layer not in direction.layers:
        raise fail(source, f"SAE reads {site.name}; the direction is at hook_{direction.site_kind}, layers "
                           f"{direction.layers[0]}-{direction.layers[-1]}")
    return site


def sae_record(direction: Direction, sae: str | Path, labels_folder: str | Path | None, top: int) -> dict:
    """The top latents by |decoder cosine| at the SAE's layer, beside random directions, with their labels."""
    loaded = load_sae(sae)
    site = sae_site(loaded, direction, sae)
    labels = read_labels(labels_folder, loaded) if labels_folder is not None else None
    table, summary = decoder_cosines(loaded, direction.vector(site.layer), top)
    latents = [{"rank": int(r["rank"]), "latent": int(r["latent"]), "cosine": float(r["cosine"]),
                "random_p95": float(r["random_p95"]),
                "label": None if labels is None else labels.get(int(r["latent"]))}
               for r in table.to_dict("records")]
    return {"source": str(sae), "site": site.name, "layer": site.layer, "d_sae": loaded.d_sae,
            "labels": labels is not None, "latents": latents, **summary}


# ---------------------------------------------------------------- cosines to other directions


def load_others(direction: Direction, paths: Sequence[str | Path], force: bool) -> list[tuple[str, Direction]]:
    """The --with directions, named uniquely, each checked comparable with the card's (width; base unless forced)."""
    if not paths:
        return []
    own = direction.path or Path(direction.name)
    names = artifact_names([own, *map(Path, paths)])
    others = [Direction.load(p) for p in paths]
    check_comparable([direction, *others], [str(p) for p in [own, *paths]], force)
    return list(zip(names[1:], others, strict=True))


def model_relation(a: Direction, b: Direction) -> str:
    """same model | other checkpoint (same base, other weights) | other base model | model not recorded."""
    model_a, model_b = a.cfg.model, b.cfg.model
    if model_a.get("fingerprint") and model_a.get("fingerprint") == model_b.get("fingerprint"):
        return "same model"
    base_a, base_b = model_a.get("base_fingerprint"), model_b.get("base_fingerprint")
    if base_a and base_a == base_b:
        return "other checkpoint"
    return "other base model" if base_a and base_b else "model not recorded"


def cosine_record(direction: Direction, name: str, other: Direction, table: pd.DataFrame) -> dict:
    """Cosines of one other direction with the card's: per common layer, at each one's best layer, the largest."""
    part = table[table.b == name].sort_values("layer")
    per_layer = [{"layer": int(r["layer"]), "cosine": float(r["cosine"]), "above_random": bool(r["above_random"])}
                 for r in part.to_dict("records")]
    largest = max(per_layer, key=lambda r: abs(r["cosine"]), default=None)
    return {"name": name, "path": str(other.path) if other.path else None, "direction": other.name,
            "relation": model_relation(direction, other), "model": other.cfg.model.get("model"),
            "adapter": other.cfg.model.get("adapter"), "best_layer": other.best_layer,
            "at_best_layer": _cosine_at(direction, other, direction.best_layer),
            "at_their_best_layer": _cosine_at(direction, other, other.best_layer),
            "largest": largest, "layers_above_random": sum(r["above_random"] for r in per_layer),
            "per_layer": per_layer}


def _cosine_at(a: Direction, b: Direction, layer: int) -> float | None:
    return cosine(a.vector(layer), b.vector(layer)) if layer in a.layers and layer in b.layers else None


def cosines_record(direction: Direction, others: list[tuple[str, Direction]]) -> dict | None:
    if not others:
        return None
    own = "this direction"
    table = cosine_table([direction, *[d for _, d in others]], [own, *[n for n, _ in others]])
    table = table[table.a == own]
    return {"d_model": direction.d_model, "random_p95": random_cosine_quantile(direction.d_model),
            "others": [cosine_record(direction, name, other, table) for name, other in others]}


# ---------------------------------------------------------------- the steering effect


def read_steer_run(run: str | Path) -> dict:
    """A finished `emlens steer` folder's cfg.json, dose-response and direction-minus-control tables."""
    run = Path(run)
    cfg = read_json(run / CFG_FILE) if (run / CFG_FILE).is_file() else {}
    if cfg.get("kind") != EXPERIMENT_KIND or not cfg.get("finished"):
        raise fail(run, "not a finished `emlens steer` run (no finished steering_experiment cfg.json)")
    if (cfg.get("spec") or {}).get("latent") is not None:
        raise fail(run, f"steers SAE latent {cfg['spec']['latent']}, not a direction")
    return {"cfg": cfg, "curves": pd.read_csv(run / "dose_response.csv"),
            "paired": pd.read_csv(run / "direction_vs_control.csv")}


def steered_check(cfg: dict, run: Path, direction: Direction) -> str:
    """Whether the run steered this direction, by the vector at the steered layer (a folder may have been refitted
    since): 'same folder', 'same vector' (a copy elsewhere), or 'not verified' (the steered folder is gone);
    another vector is an error."""
    recorded, layer = Path(cfg["direction"]), int(cfg["layer"])
    if not recorded.exists():
        return "not verified (the steered folder no longer exists)"
    steered = Direction.load(recorded)
    if (steered.d_model != direction.d_model or layer not in direction.layers or layer not in steered.layers
            or cosine(steered.vector(layer), direction.vector(layer)) < 1 - 1e-6):
        raise fail(run, f"steered {recorded} at layer {layer}, another vector than "
                        f"{direction.path or direction.name}'s")
    same = direction.path is not None and recorded.resolve() == Path(direction.path).resolve()
    return "same folder" if same else "same vector"


def largest_scale(curves: pd.DataFrame, run: object) -> tuple[str, float]:
    """(operation, alpha) of the strongest steered condition: the largest alpha added, else the ablation."""
    steered = curves[curves.operation.isin(["add", "ablate_add"])]
    if steered.empty:
        steered = curves[curves.operation == "ablate"]
    if steered.empty:
        raise fail(run, "no steered condition in dose_response.csv")
    row = steered.loc[steered.alpha.abs().idxmax()]
    return str(row.operation), float(row.alpha)


def steering_rows(curves: pd.DataFrame, paired: pd.DataFrame, operation: str, alpha: float) -> list[dict]:
    """Per nudge x measure at (operation, alpha): direction and control rates with CIs, the baseline, and the paired
    difference with its CI and verdict (no control in the run: None)."""
    at = curves[(curves.operation == operation) & (curves.alpha == alpha)]
    baseline = curves[curves.operation == "none"].set_index(["nudge", "measure"]).rate
    pairs = paired[(paired.operation == operation) & (paired.alpha == alpha)].set_index(["nudge", "measure"])
    rows = []
    for (nudge, measure), part in at.groupby(["nudge", "measure"]):
        steered, control = part[~part.control.astype(bool)], part[part.control.astype(bool)]
        pair = pairs.loc[(nudge, measure)].to_dict() if (nudge, measure) in pairs.index else None
        rows.append({"nudge": nudge, "measure": measure, **_rate(steered, "direction"), **_rate(control, "control"),
                     "baseline": _number(baseline.to_dict(), (nudge, measure)),
                     "difference": None if pair is None else _number(pair, "difference"),
                     "difference_ci_low": None if pair is None else _number(pair, "ci_low"),
                     "difference_ci_high": None if pair is None else _number(pair, "ci_high"),
                     "n_pairs": None if pair is None else int(pair["n_pairs"]),
                     "p_bh": None if pair is None else _number(pair, "p_bh"),
                     "verdict": None if pair is None else steer_verdict(pair, pair.get("p_bh", 1.0))})
    return rows


def _rate(part: pd.DataFrame, prefix: str) -> dict:
    row = part.iloc[0].to_dict() if len(part) else {}
    return {prefix: _number(row, "rate"), f"{prefix}_ci_low": _number(row, "ci_low"),
            f"{prefix}_ci_high": _number(row, "ci_high"), f"{prefix}_n": int(row["n"]) if row else None}


def steering_record(run: str | Path, direction: Direction) -> dict:
    found = read_steer_run(run)
    cfg = found["cfg"]
    operation, alpha = largest_scale(found["curves"], run)
    spec = cfg.get("spec") or {}
    return {"run": str(run), "steered": cfg["direction"], "check": steered_check(cfg, Path(run), direction),
            "layer": int(cfg["layer"]), "site": cfg.get("site"), "operation": operation, "scale": alpha,
            "scale_unit": spec.get("scale_unit"), "positions": spec.get("positions"),
            "rows": steering_rows(found["curves"], found["paired"], operation, alpha)}


# ---------------------------------------------------------------- the card


def as_direction(direction: Direction | str | Path) -> Direction:
    return direction if isinstance(direction, Direction) else Direction.load(direction)


def build_card(direction: Direction, others: Sequence[tuple[str, Direction]] = (), sae: str | Path | None = None,
               labels: str | Path | None = None, steer: str | Path | None = None, top: int = 10) -> dict:
    """Everything a card shows, as card.json holds it (`others`: named directions from `load_others`)."""
    if labels is not None and sae is None:
        raise fail(labels, "latent labels need the SAE they explain (--sae)")
    key = metric_key(direction)
    card = {"kind": CARD_KIND, "format_version": FORMAT_VERSION,
            "direction": str(direction.path) if direction.path else None, "name": direction.name, "metric": key,
            "fit": fit_record(direction), "best": best_record(direction, key), "layers": layer_rows(direction),
            "lens": getattr(direction.cfg, "lens", None),
            "sae": sae_record(direction, sae, labels, top) if sae is not None else None,
            "cosines": cosines_record(direction, list(others)),
            "steering": steering_record(steer, direction) if steer is not None else None,
            "versions": versions(), "created": time.time()}
    return {**card, "not_recorded": missing_parts(card)}


def missing_parts(card: dict) -> list[str]:
    """What the artifact did not record (and the card therefore does not show)."""
    rows, key = card["layers"], card["metric"]
    checks = {f"held-out {key} by layer": not rows, "CI per layer": not any(r["ci_low"] is not None for r in rows),
              "shuffled-label null": not any(r["null_high"] is not None for r in rows),
              "logit-lens tokens": not card["lens"], "model fingerprint": not card["fit"]["fingerprint"],
              "data hash": not card["fit"]["data_hash"], "n per class": card["fit"]["n_positive"] is None
              and key == "auroc"}
    return [name for name, missing in checks.items() if missing]


def direction_card(direction: Direction | str | Path, out: str | Path, others: Sequence[str | Path] = (),
                   sae: str | Path | None = None, labels: str | Path | None = None, steer: str | Path | None = None,
                   top: int = 10, force: bool = False) -> dict:
    """`emlens card`: the card of a direction artifact into OUT (card.md, card.html, card.json, card.png, and
    cosines.png with `others`), written whole; returns card.json's content. `force` compares directions fitted on
    another base model."""
    check_writable_folder(out, CARD_KIND)  # before any work
    direction = as_direction(direction)
    loaded = load_others(direction, others, force)
    card = build_card(direction, loaded, sae, labels, steer, top)  # every input checked before anything is written
    with atomic_folder(out, CARD_KIND) as tmp:
        figures = draw_figures(direction, card, loaded, tmp)
        blocks = card_blocks(card, figures)
        title = f"Direction card: {card['name']}"
        atomic_write_text(tmp / "card.md", card_markdown(title, blocks))
        atomic_write_text(tmp / "card.html", render_html(title, blocks))
        atomic_write_json(tmp / "card.json", jsonable(card))
        atomic_write_json(tmp / CFG_FILE, {"kind": CARD_KIND, "format_version": FORMAT_VERSION,
                                           "direction": card["direction"], "created": card["created"]})
    return card


def draw_figures(direction: Direction, card: dict, others: list[tuple[str, Direction]], folder: Path) -> dict:
    """card.png (the metric by layer over the shuffled-label band) where the artifact has per-layer metrics, and
    cosines.png (each other direction by layer, |cos| under the random p95 crossed) with others."""
    figures = {}
    metrics = direction.metrics()
    if not metrics.empty and card["metric"] in metrics and "n" in metrics:
        figures["metric"] = layer_metrics_figure({direction.name: direction}, folder / "card.png",
                                                 f"{direction.name}: held-out {card['metric']} by layer")
    if others:
        names = ["this direction", *[name for name, _ in others]]
        table = cosine_table([direction, *[d for _, d in others]], names)
        figures["cosines"] = plot_cosines([direction, *[d for _, d in others]], names, table, folder / "cosines.png")
    return figures


# ---------------------------------------------------------------- rendering


def shown(value, digits: int = 3) -> str:
    """A card cell: numbers rounded, what is missing 'not recorded'."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return NOT_RECORDED
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def interval(low, high) -> str:
    return NOT_RECORDED if low is None or high is None else f"[{low:.3f}, {high:.3f}]"


def fit_blocks(card: dict) -> list[Block]:
    fit = card["fit"]
    rows = [("method", fit["method"]), ("site", f"blocks.L.hook_{fit['site_kind']}, layers {_layers(fit['layers'])}"),
            ("best layer", fit["best_layer"]), ("position", fit["position"]), ("d_model", fit["d_model"]),
            ("model", fit["model"]), ("adapter", fit["adapter"] or ("none" if fit["model"] else None)), ("fingerprint", fit["fingerprint"]),
            ("base fingerprint", fit["base_fingerprint"]), ("rows (n)", fit["n"]),
            ("positive / negative", None if fit["n_positive"] is None else f"{fit['n_positive']} / {fit['n_negative']}"),
            ("prompt groups", fit["n_groups"]), ("data hash", fit["data_hash"]),
            ("contrast", fit["contrast"]), ("score", fit["score"]), ("sources", ", ".join(fit["sources"]) or None),
            ("spec", fit["spec_file"]), ("spec sha256", fit["spec_sha256"]), ("folds", fit["folds"]),
            ("regularization", fit["regularization"]), ("seed", fit["seed"]),
            ("emlens version", fit["emlens_version"])]
    table = pd.DataFrame({"field": [k for k, _ in rows], "value": [shown(v) for _, v in rows]})
    blocks = [Block("heading", "How it was fitted")]
    blocks += [Block("text", fit["description"])] if fit["description"] else []
    return blocks + [Block("table", table)]


def _layers(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else ",".join(map(str, layers))


def metric_blocks(card: dict, figures: dict) -> list[Block]:
    key, best, rows = card["metric"], card["best"], card["layers"]
    name = "AUROC" if key == "auroc" else "R²"
    methods = sorted({r["ci_method"] for r in rows if r["ci_method"]})
    text = (f"Held-out {name} by layer (folds split by prompt group; mean over folds, its SD over folds), 95 % CI "
            f"({', '.join(methods) or NOT_RECORDED}), beside the same fit on shuffled labels (mean and range over "
            f"its shuffles): a layer whose value does not clear the null's top separates no better than chance. "
            f"Best layer {best['layer']}: {name} {shown(best[key])}, nested-CV estimate of the chosen layer "
            f"{shown(best[f'{key}_nested'])} (the per-layer value picks and reports on the same folds).")
    table = pd.DataFrame([{"layer": r["layer"], name: shown(r[key]), "fold SD": shown(r["fold_sd"]),
                           "95 % CI": interval(r["ci_low"], r["ci_high"]), "null (shuffled)": shown(r["null"]),
                           "null range": interval(r["null_low"], r["null_high"]),
                           "above null": shown(r["above_null"]), "n": shown(r["n"])} for r in rows])
    blocks = [Block("heading", f"Held-out {name} by layer"), Block("text", text)]
    blocks += [Block("table", table)] if rows else [Block("text", f"Per-layer metrics: {NOT_RECORDED}.")]
    return blocks + ([Block("figure", figures["metric"])] if "metric" in figures else [])


def lens_blocks(card: dict) -> list[Block]:
    lens = card["lens"]
    if not lens:
        return [Block("heading", "Logit lens"), Block("text", f"Tokens: {NOT_RECORDED} (fitted before directions "
                                                            "recorded them; `emlens lens DIR` reads them).")]
    table = pd.DataFrame({"rank": range(1, len(lens["promoted"]) + 1),  # repr: spaces and control bytes show
                          "promotes": [repr(t) for t in lens["promoted"]],
                          "suppresses": [repr(t) for t in lens["suppressed"]]})
    return [Block("heading", "Logit lens"),
            Block("text", f"The direction at layer {lens['layer']} through the model's final norm and unembedding: "
                          f"{token_line(lens)}."), Block("table", table)]


def sae_blocks(card: dict) -> list[Block]:
    sae = card["sae"]
    if sae is None:
        return []
    table = pd.DataFrame([{"rank": r["rank"], "latent": r["latent"], "cosine": shown(r["cosine"]),
                           "random p95": shown(r["random_p95"]),
                           "label": r["label"] or ("no label" if sae["labels"] else "no labels given")}
                          for r in sae["latents"]])
    text = (f"SAE {sae['source']} at {sae['site']} ({sae['d_sae']} latents): the latents whose decoder vectors point "
            f"most along the direction at layer {sae['layer']}. Beside each, the 95th percentile of the |cosine| at "
            f"that rank for random directions. Latents above the random top-1 ({sae['random_max_abs_cosine_p95']:.3f}): "
            f"{sae['latents_above_random']}.")
    return [Block("heading", "Top SAE latents"), Block("text", text), Block("table", table)]


def cosine_blocks(card: dict, figures: dict) -> list[Block]:
    cosines = card["cosines"]
    if cosines is None:
        return []
    blocks = [Block("heading", "Cosines to other directions"),
              Block("text", f"Two random unit vectors in {cosines['d_model']} dimensions have |cos| below "
                            f"{cosines['random_p95']:.3f} 95 % of the time (the random baseline; crossed cells in the "
                            "figure are below it).")]
    groups = {"Other directions of the same model": [o for o in cosines["others"] if o["relation"] == "same model"],
              "The direction on other models and checkpoints": [o for o in cosines["others"]
                                                                 if o["relation"] != "same model"]}
    for title, others in groups.items():
        if others:
            blocks += [Block("heading", title, 3), Block("table", cosine_summary(card, others))]
    return blocks + ([Block("figure", figures["cosines"])] if "cosines" in figures else [])


def cosine_summary(card: dict, others: list[dict]) -> pd.DataFrame:
    best = card["best"]["layer"]
    return pd.DataFrame([{"direction": o["name"], "relation": o["relation"], "model": shown(o["model"]),
                          f"cos at layer {best}": shown(o["at_best_layer"]),
                          "cos at its best layer": f"{shown(o['at_their_best_layer'])} (layer {o['best_layer']})",
                          "largest |cos|": NOT_RECORDED if o["largest"] is None else
                          f"{o['largest']['cosine']:.3f} (layer {o['largest']['layer']})",
                          "layers above random": f"{o['layers_above_random']} of {len(o['per_layer'])}"}
                         for o in others])


def steering_blocks(card: dict) -> list[Block]:
    steering = card["steering"]
    if steering is None:
        return [Block("heading", "Steering"), Block("text", f"Steering effect: {NOT_RECORDED} (pass an `emlens "
                                                            "steer` run with --steer).")]
    table = pd.DataFrame([{"nudge": r["nudge"], "measure": r["measure"], "baseline": shown(r["baseline"]),
                           "direction": f"{shown(r['direction'])} {interval(r['direction_ci_low'], r['direction_ci_high'])}",
                           "random control": f"{shown(r['control'])} {interval(r['control_ci_low'], r['control_ci_high'])}",
                           "direction - control": f"{shown(r['difference'])} "
                                                  f"{interval(r['difference_ci_low'], r['difference_ci_high'])}",
                           "pairs": shown(r["n_pairs"]), "verdict": shown(r["verdict"])} for r in steering["rows"]])
    text = (f"`emlens steer` run {steering['run']} ({steering['check']}): {steering['operation']} at scale "
            f"{steering['scale']:g} ({steering['scale_unit'] or 'raw_norm'}), layer {steering['layer']} "
            f"({steering['site']}), the largest scale it ran. Rates with 95 % CIs, the random same-norm control beside "
            "them, and the direction-minus-control difference paired by prompt and seed.")
    return [Block("heading", "Steering"), Block("text", text), Block("table", table)]


def card_blocks(card: dict, figures: dict) -> list[Block]:
    summary = (f"{card['fit']['kind']} '{card['name']}' from {card['direction'] or 'memory'}. Not recorded by this "
               f"artifact: {', '.join(card['not_recorded']) or 'nothing'}.")
    return [Block("text", summary), *fit_blocks(card), *metric_blocks(card, figures), *lens_blocks(card),
            *sae_blocks(card), *cosine_blocks(card, figures), *steering_blocks(card)]


def card_markdown(title: str, blocks: list[Block]) -> str:
    """The blocks as Markdown, figures linked beside it (card.png, cosines.png)."""
    parts = [f"# {title}"]
    for block in blocks:
        if block.kind == "heading":
            parts.append(f"{'#' * block.level} {block.content}")
        elif block.kind == "text":
            parts.append(str(block.content))
        elif block.kind == "table":
            parts.append(markdown_table(block.content))
        else:
            parts.append(f"![{Path(block.content).stem}]({Path(block.content).name})")
    return "\n\n".join(parts) + "\n"


def markdown_table(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in frame.itertuples(index=False)])


def jsonable(value):
    """card.json without NaN (not JSON): None where a number is missing."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


@register_artifact(CARD_KIND, whole=True)
def open_card(folder: Path) -> dict:
    """`em.load(OUT)` of `emlens card`: card.json's content."""
    return read_json(Path(folder) / "card.json")
