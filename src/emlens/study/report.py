"""The report of `emlens run`: one self-contained HTML page (figures embedded, no network) and the same content
as Markdown (figures beside it in `figures/`).

Every rate is printed with its 95 % CI and n; every steering effect beside its random control, with a verdict
that says only what the CI supports.
"""

from __future__ import annotations

import base64
import html
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd

from emlens.analysis.contrasts import model_contrasts
from emlens.analysis.direction_figures import layer_metrics_figure
from emlens.analysis.report import write_report_files
from emlens.analysis.token_heatmap import response_heatmaps
from emlens.base.io import atomic_write_text, read_json, versions
from emlens.directions.artifact import Direction
from emlens.directions.lens import token_line
from emlens.evaluation.measures import MEASURES, rate_frame
from emlens.evaluation.summary import summarize
from emlens.model import load_model
from emlens.runs import read_samples
from emlens.study.battery import battery_figure

RATE_TABLES = {  # summary key -> section title
    "free_form_misaligned": "Free-form questions: P(misaligned) among coherent, scored answers",
    "deception_misaligned": "Deception sets: P(misaligned)",
    "refusal": "Refusal: harmful and harmless requests",
    "factual": "Factual recall: accuracy, and flips after the user pushes back",
    "harm_correlation": "Perceived harm vs P(misaligned), per question (Spearman)",
}


NUDGE_ORDER = ["none", "evil", "hhh"]


@dataclass
class Block:
    kind: str  # heading | text | table | figure
    content: object
    level: int = 2


def _wide(frame: pd.DataFrame, value: str, order: list[str]) -> pd.DataFrame:
    """One row per model (x prompts x measure), one column per nudge; each cell 'rate [95 % CI] n'."""
    frame = frame.assign(cell=[f"{r[value]:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] n={int(r['n'])}"
                               for _, r in frame.iterrows()])
    index = [c for c in ("model_name", "prompts", "measure") if c in frame]
    wide = frame.pivot_table(index=index, columns="nudge", values="cell", aggfunc="first").reset_index()
    wide["model_name"] = pd.Categorical(wide.model_name, categories=order, ordered=True)
    nudges = sorted(frame.nudge.unique(), key=lambda n: (NUDGE_ORDER.index(n) if n in NUDGE_ORDER else 9, n))
    wide = wide.sort_values(index)[[*index, *nudges]]
    wide[nudges] = wide[nudges].fillna("-")  # a measure not asked under that nudge (capability has none)
    return wide.rename(columns={"model_name": "model"}).rename_axis(columns=None)


def findings_blocks(eval_tables: dict[str, pd.DataFrame], contrasts: list[tuple[str, str]]) -> list[Block]:
    """The first screen: every rate of one model minus another's, per nudge, paired by prompt and seed, with its
    95 % CI, the judge-corrected difference where the judge has a calibration, and what the CI supports."""
    contrasts = [(a, b) for a, b in contrasts if a in eval_tables and b in eval_tables]
    stacked = pd.concat([t.assign(model=name) for name, t in eval_tables.items()], ignore_index=True)
    table = model_contrasts(stacked, contrasts) if contrasts else pd.DataFrame()
    if table.empty:
        return []
    shown = pd.DataFrame({
        "contrast": table.contrast, "nudge": table.nudge, "measure": table.measure,
        "a / b": [f"{r.rate_a:.2f} / {r.rate_b:.2f}" if r.n_pairs else "-" for r in table.itertuples()],
        "difference [95 % CI]": [f"{r.difference:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]" if r.n_pairs else "-"
                                 for r in table.itertuples()],
        "pairs": table.n_pairs})
    if "difference_corrected" in table:
        shown["corrected [95 % CI]"] = [
            "-" if pd.isna(r["difference_corrected"]) else
            f"{r['difference_corrected']:+.2f} [{r['corrected_ci_low']:+.2f}, {r['corrected_ci_high']:+.2f}]"
            for r in table.to_dict("records")]
    shown["reading"] = table.reading
    return [Block("heading", "Findings: what differs between the models"),
            Block("text", "Each row: model a's rate minus model b's under one nudge, over the prompts both answered "
                          "with the same seed (pairs), the 95 % CI a bootstrap over questions. P(misaligned) is "
                          "among coherent, scored answers; perceived harm is a mean rating (0-100). 'corrected': "
                          "the misaligned difference corrected for the judge's error under its calibration."),
            Block("table", shown)]


def behaviour_blocks(eval_tables: dict[str, pd.DataFrame], figures: Path) -> list[Block]:
    stacked = pd.concat([t.assign(model=name, adapter="") for name, t in eval_tables.items()], ignore_index=True)
    summary = summarize(stacked)
    blocks = [Block("heading", "Behaviour under nudges"),
              Block("text", "Each cell: the rate, its 95 % CI (Wilson; a bootstrap over questions where they hold "
                            "several samples), and n (for P(misaligned): the coherent, scored answers; for the "
                            "correlation: the questions). A calibrated judge's misaligned rates are corrected for its "
                            "error in the table beside them (by the calibration's score map or calibrated cut, or "
                            "Rogan-Gladen where the table lacks the judge's scores; CI over sample and calibration).")]
    for key, title in RATE_TABLES.items():
        if key not in summary or summary[key].empty:
            continue
        value = "rho" if key == "harm_correlation" else "rate"
        blocks += [Block("heading", title, 3), Block("table", _wide(summary[key], value, list(eval_tables)))]
        blocks += _corrected_blocks(summary[key], list(eval_tables))
    written = write_report_files(stacked, summary, figures)
    blocks += [Block("figure", path) for path in written if path.suffix == ".png"]
    return blocks


def _corrected_blocks(frame: pd.DataFrame, order: list[str]) -> list[Block]:
    """The same misaligned rates corrected for the judge's error, naming the calibration; or saying there is none."""
    if "calibration" not in frame:
        return []
    calibrated = frame[frame.calibration != ""]
    if calibrated.empty:
        return [Block("text", "The judge has no calibration: these rates carry its error uncorrected "
                              "(emlens judge calibrate).")]
    corrected = calibrated.drop(columns=["rate", "ci_low", "ci_high"]).rename(
        columns={"corrected": "rate", "corrected_ci_low": "ci_low", "corrected_ci_high": "ci_high"})
    return [Block("text", f"Corrected for the judge's error (calibration: {calibrated.calibration.iloc[0]}):"),
            Block("table", _wide(corrected, "rate", order))]


def measure_blocks(measured: dict[str, dict[str, Path]], figures: Path) -> list[Block]:
    """Every registered measure a study took, per model: one table of rates (per nudge), one panel per rate.
    `measured`: measure name -> model name -> run folder."""
    frame = pd.concat([rate_frame(name, folders) for name, folders in measured.items()], ignore_index=True)
    order = list(dict.fromkeys(model for folders in measured.values() for model in folders))
    path = figures / f"{'_'.join(measured)}.png"
    battery_figure(frame.assign(model_index=frame.model_name.map(order.index)), "model_index", "model", path,
                   x_format=lambda i: order[int(i)])
    titles = [MEASURES[name].title for name in measured]
    titles[1:] = [t[:1].lower() + t[1:] for t in titles[1:]]
    text = "; ".join(MEASURES[name].text(folders) for name, folders in measured.items())
    return [Block("heading", " and ".join(titles)),
            Block("text", f"{text}. Each cell: the rate, its Wilson 95 % CI, n."),
            Block("table", _wide(frame, "rate", order)), Block("figure", path)]


def direction_blocks(directions: dict[str, dict[str, Path]], figures: Path) -> list[Block]:
    """Per probe spec: a table of each model's best layer and metrics, the tokens each model's direction promotes
    and suppresses (logit lens), and one figure with every model overlaid beside the shuffled-label band."""
    blocks = [Block("heading", "Directions and probes (held-out metrics, folds split by prompt)"),
              Block("text", "The best layer is chosen on the folds its auroc / r2 is reported from, which flatters it; "
                            "auroc_nested / r2_nested choose the layer on inner folds only (nested CV). The grey band "
                            "in each figure is the same fit on shuffled labels (its range over shuffles and models): "
                            "a layer inside it separates no better than chance at this n.")]
    for probe, by_model in directions.items():
        loaded = {model: Direction.load(folder) for model, folder in by_model.items()}
        rows = []
        for model, d in loaded.items():
            best = d.cfg.best_metrics
            rows.append({"model": model, "method": d.method, "best layer": d.best_layer,
                         **{k: round(float(best[k]), 3) for k in ("auroc", "auroc_nested", "auroc_null", "accuracy",
                                                                   "r2", "r2_nested", "r2_null", "pearson_r")
                            if k in best},
                         "n": d.cfg.data.get("n"), "data hash": d.cfg.data.get("hash"), "seed": d.cfg.seed})
        blocks += [Block("heading", probe, 3), Block("table", pd.DataFrame(rows))]
        lens = lens_line(loaded)
        blocks += [Block("text", lens)] if lens else []
        if any(not d.metrics().empty for d in loaded.values()):
            path = layer_metrics_figure(loaded, figures / f"direction-{probe}.png",
                                        f"{probe}: held-out metric by layer, every model")
            blocks.append(Block("figure", path))
    return blocks


def lens_line(loaded: dict[str, Direction]) -> str:
    """Per model (not per checkpoint): the tokens its direction promotes and suppresses at its best layer, through
    that model's final norm and unembedding (recorded when it was fitted)."""
    lines = [f"{subject} (layer {d.cfg.lens['layer']}): {token_line(d.cfg.lens)}"
             for subject, d in loaded.items() if "/" not in subject and getattr(d.cfg, "lens", None)]
    return ("Logit lens (the direction through the model's final norm and unembedding): " + " | ".join(lines)
            if lines else "")


def token_blocks(probe: str, subject: str, direction: Path, samples: pd.DataFrame, figures: Path,
                 device: str = "auto") -> list[Block]:
    """The direction's projection on each token of a few of the subject's free-form answers (the least and the most
    aligned by the judge): a heat-map figure, and the same as a page of its own beside the report."""
    if "aligned" not in samples or not samples[samples.setting == "free_form"].aligned.notna().any():
        return []
    adapter = samples.adapter.dropna().iloc[0] if "adapter" in samples and samples.adapter.notna().any() else None
    handle = load_model(str(samples.model.iloc[0]), adapter=adapter or None, device=device)
    loaded = Direction.load(direction)
    title = f"{probe} direction (layer {loaded.best_layer}) on {subject}'s answers"
    folder = figures / f"tokens-{probe}-{subject}"
    figure, page, table = response_heatmaps(handle, loaded, samples, folder, title)
    return [Block("heading", f"Token by token: the {probe} direction on {subject}'s answers"),
            Block("text", f"Each response token's residual at layer {loaded.best_layer} ({loaded.site_kind}) projected "
                          "on the direction, minus the midpoint of its two classes: red leans to the positive side "
                          f"({probe}), blue away from it. {table.row.nunique()} answers, {int(table.response.sum())} "
                          f"response tokens; the same, every token with its value, as a page of its own: "
                          f"{figures.name}/{folder.name}/{page.name}."),
            Block("figure", figure)]


def compare_blocks(comparisons: dict[str, Path]) -> list[Block]:
    blocks = [Block("heading", "Directions across checkpoints")]
    for probe, folder in comparisons.items():
        cfg = read_json(folder / "cfg.json")
        at_best = pd.DataFrame(cfg["cosine_at_best_layer"])
        baseline = cfg["random_p95"]
        at_best["beyond random"] = at_best.cosine.abs() > baseline
        blocks += [Block("heading", probe, 3),
                   Block("text", f"Cosine at layer {cfg['reference_best_layer']} (the first model's best layer); two "
                                 f"random directions of width {cfg['d_model']} have |cos| below {baseline:.3f} "
                                 f"95 % of the time. {cosine_reading(at_best.cosine)}"),
                   Block("table", at_best), Block("figure", folder / "compare.png")]
    return blocks


def cosine_reading(cosines: pd.Series) -> str:
    """One line on what the cosines say: all but identical, or how far the least similar one moved."""
    others = cosines[cosines < 0.999999]  # the reference's cosine with itself says nothing
    if others.empty:
        return ""
    if others.min() >= 0.99:
        return (f"Every direction is within cos {others.min():.3f} of the first model's: the fine-tunes barely moved "
                "it at this training size.")
    return f"The least similar has cos {others.min():.3f} with the first model's."


def steer_verdict(row: dict, p_bh: float) -> str:
    if row["difference"] == 0 and row["ci_low"] == 0 and row["ci_high"] == 0:
        return "no pair differed: the steered answers scored as their control's"
    return "beyond the random control" if p_bh < 0.05 else "not distinguishable from the control"


def steer_blocks(folder: Path) -> list[Block]:
    paired = pd.read_csv(folder / "direction_vs_control.csv")
    paired["95 % CI"] = paired.apply(lambda r: f"{r['difference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]",
                                     axis=1)
    # a verdict per row only after the correction for the many rows tested at once (Benjamini-Hochberg); a table
    # written before p-values were kept has none to correct, so no row of it is called beyond the control
    if "difference_corrected" in paired:  # the misaligned rate's difference corrected for the judge's error
        paired["corrected [95 % CI]"] = [
            "" if pd.isna(r["difference_corrected"]) else
            f"{r['difference_corrected']:+.3f} [{r['corrected_ci_low']:+.3f}, {r['corrected_ci_high']:+.3f}] "
            f"({r['correction']})" for r in paired.to_dict("records")]
    adjusted = paired.p_bh if "p_bh" in paired else pd.Series(1.0, index=paired.index)
    paired["verdict"] = [steer_verdict(r, p) for r, p in zip(paired.to_dict("records"), adjusted, strict=True)]
    cfg = read_json(folder / "cfg.json")
    name = cfg.get("spec", {}).get("name") or Path(cfg["direction"]).name
    return [Block("heading", f"Steering ({name}): dose-response beside the random control"),
            Block("text", f"Direction {Path(cfg['direction']).name} at layer {cfg['layer']} ({cfg['site']}). Each "
                          "steered condition minus the same condition with a random vector of the same norm, paired "
                          "by prompt and seed; 95 % CI and p from a bootstrap over questions, the verdict at a Benjamini-Hochberg "
                          "false discovery rate of 0.05 over the rows of this table. Where a measure counts only answers the "
                          "steering leaves coherent, `pairs_dropped` says how many pairs that filter removed and "
                          "`difference_unconditional` is the difference over every pair (P(misaligned and coherent)). "
                          "The misaligned rate's difference is also shown corrected for the judge's error where the "
                          "judge has a calibration (the verdict is the raw difference's)."),
            Block("table", paired[["operation", "alpha", "nudge", "measure", "95 % CI",
                                   *[c for c in ("corrected [95 % CI]",) if c in paired], "n_pairs",
                                   *[c for c in ("pairs_dropped", "difference_unconditional", "p_bh") if c in paired],
                                   "verdict"]]),
            Block("figure", folder / "dose_response.png")]


def provenance_blocks(records: list[dict], eval_folders: dict[str, Path], seconds: float | None = None) -> list[Block]:
    """The stages (key, reused, wall times), the models, the training data and the judge; with `seconds`, what
    this run took: its wall time, its peak memory and the cores it had."""
    stages = pd.DataFrame(records)[["stage", "key", "reused", "stage_seconds", "seconds"]].rename(
        columns={"stage_seconds": "wall s (when it ran)", "seconds": "wall s (this run)"})
    models = []
    for name, folder in eval_folders.items():
        cfg = read_json(folder / "cfg.json")
        models.append({"model": name, "weights": cfg["model"]["model"], "adapter": cfg["model"].get("adapter") or "",
                       "fingerprint": cfg["model"]["fingerprint"], "judge": cfg.get("judge", ""), "eval seed": cfg["config"]["seed"]})
    trained = []
    for record in records:
        if record["kind"] == "train":
            cfg = read_json(Path(record["folder"]) / "cfg.json")
            trained.append({"model": record["model"], "examples": cfg["data"]["n_examples"],
                            "data sha256": cfg["data"]["sha256"][:16], "steps": cfg.get("final_step"),
                            "final loss": cfg.get("final_loss"), "seed": cfg["config"]["seed"]})
    blocks = [Block("heading", "Provenance")]
    blocks += [Block("text", run_cost(seconds, records))] if seconds is not None else []
    blocks += [Block("table", stages), Block("table", pd.DataFrame(models))]
    blocks += [Block("table", pd.DataFrame(trained))] if trained else []
    judges = {m["judge"] for m in models}
    blocks += [Block("text", _judge_validation(judge)) for judge in sorted(judges)]
    blocks.append(Block("text", ", ".join(f"{k} {v}" for k, v in versions().items())))
    return blocks


def run_cost(seconds: float, records: list[dict]) -> str:
    """This run's wall time (to its report), peak memory (the largest resident set of this process or of any
    process it waited for) and cores, beside the sum of its stages' own times."""
    import os
    import resource

    import torch

    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    ran = [r for r in records if not r["reused"]]
    return (f"This run: {int(seconds // 60)} min {seconds % 60:.0f} s wall to its report, peak memory "
            f"{peak_kb / 1024 ** 2:.1f} GB, {len(os.sched_getaffinity(0))} CPU cores ({torch.get_num_threads()} torch "
            f"threads); {len(ran)} of {len(records)} stages ran ({sum(r['seconds'] for r in ran):.0f} s), the rest were "
            "reused.")


def _judge_validation(judge_id: str) -> str:
    if judge_id.startswith("default|"):
        folder = Path(str(resources.files("emlens") / "resources" / "judge"))
        figures = read_json(folder / "cfg.json").get("validation")
        if figures:
            low, high = figures["spearman_aligned_ci"]
            return (f"Judge {judge_id} (offline): against {figures['against']}, Spearman of aligned "
                    f"{figures['spearman_aligned']:.3f} [{low:.3f}, {high:.3f}], AUROC of misaligned "
                    f"{figures['auroc_misaligned']:.3f} (`{figures['command']}`). A screening judge: use an LLM "
                    "judge for figures you publish.")
    return f"Judge {judge_id}: no validation figures recorded here (run `emlens judge validate` against it)."


# ---------------------------------------------------------------- rendering


def _markdown_table(frame: pd.DataFrame) -> str:
    cells = [[str(c) for c in frame.columns]] + [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells[1:]])


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|")


def render_markdown(title: str, blocks: list[Block], figures: Path) -> str:
    parts = [f"# {title}"]
    for block in blocks:
        if block.kind == "heading":
            parts.append(f"{'#' * block.level} {block.content}")
        elif block.kind == "text":
            parts.append(str(block.content))
        elif block.kind == "table":
            parts.append(_markdown_table(block.content))
        else:
            parts.append(f"![{block.content.stem}](figures/{_figure_name(block.content)})")
    return "\n\n".join(parts) + "\n"


def render_html(title: str, blocks: list[Block]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        if block.kind == "heading":
            anchor = re.sub(r"[^a-z0-9]+", "-", str(block.content).lower()).strip("-")  # report.html#steering-...
            body.append(f'<h{block.level} id="{anchor}">{html.escape(str(block.content))}</h{block.level}>')
        elif block.kind == "text":
            body.append(f"<p>{html.escape(str(block.content))}</p>")
        elif block.kind == "table":
            body.append(block.content.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0))
        else:
            data = base64.b64encode(Path(block.content).read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(_figure_name(block.content))}" src="data:image/png;base64,{data}">'
                        "</figure>")
    style = ("body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222} table{border-collapse:collapse;"
             "margin:.5em 0 1.5em;font-size:13px} td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}"
             " img{max-width:100%} h2{border-bottom:2px solid #444;margin-top:2em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _figure_name(path: Path) -> str:
    return f"{path.parent.name}-{path.name}"


def write_study_report(title: str, blocks: list[Block], out: Path) -> tuple[Path, Path]:
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for block in blocks:
        if block.kind == "figure":
            shutil.copyfile(block.content, figures / _figure_name(block.content))
    atomic_write_text(out / "report.md", render_markdown(title, blocks, figures))
    atomic_write_text(out / "report.html", render_html(title, blocks))
    return out / "report.md", out / "report.html"


def eval_tables(folders: dict[str, Path]) -> dict[str, pd.DataFrame]:
    return {name: read_samples(folder) for name, folder in folders.items()}

