"""`emlens eval report`: the figures of the studies, drawn from one or more eval run tables."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from emlens.base.io import (
    CFG_FILE,
    FORMAT_VERSION,
    atomic_folder,
    atomic_write_json,
    atomic_write_table,
    read_json,
    register_artifact,
    save_figure,
    versions,
)
from emlens.evaluation.summary import summarize
from emlens.judges.calibration import load_calibration
from emlens.runs import read_samples

log = logging.getLogger(__name__)

REPORT_KIND = "eval_report"


def load_runs(runs: Iterable[str | Path]) -> pd.DataFrame:
    return pd.concat([read_samples(r) for r in runs], ignore_index=True)


def format_rate(row) -> str:
    unscored = (f"; unscored {int(row['unscored'])}/{int(row['n_judged'])}"
                if "unscored" in row and row["unscored"] == row["unscored"] else "")  # the judge gave no score
    if row["rate"] != row["rate"]:  # NaN: nothing to count
        return f"- (n={row['n']}{unscored})"
    text = f"{row['rate']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] (n={row['n']}{unscored})"
    if "calibration" not in row:
        return text
    if not row["calibration"]:
        return text + "; judge not calibrated"
    return (text + f"; corrected {row['corrected']:.3f} [{row['corrected_ci_low']:.3f}, "
            f"{row['corrected_ci_high']:.3f}]")


def print_summary(table: pd.DataFrame, echo: Callable[[str], None] = print,
                  calibration=None) -> dict[str, pd.DataFrame]:
    """One line per rate: model, intervention, nudge, rate [95 % CI] (n); a misaligned rate also corrected for
    the judge's error where it has a calibration."""
    summary = summarize(table, calibration)
    for name, frame in summary.items():
        if "rate" not in frame.columns and name != "harm_correlation":
            continue
        echo(f"== {name}")
        for _, row in frame.iterrows():
            head = " ".join(str(row[c]) for c in frame.columns if c in ("prompts", "measure", "model_name",
                                                                          "intervention", "nudge", "question_id"))
            if name == "harm_correlation":
                echo(f"  {head}: spearman {row['rho']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] (n={row['n']} questions)")
            else:
                echo(f"  {head}: {format_rate(row)}")
    return summary


def _bar_with_ci(ax, frame: pd.DataFrame, title: str, by: str = "nudge") -> None:
    """Bars of rate by nudge (or `by`), one group per model (and intervention, and nudge), with CI whiskers."""
    frame = frame.copy()
    frame["series"] = frame.model_name + np.where(frame.intervention != "none", " | " + frame.intervention, "")
    if by != "nudge":
        frame["series"] += " | " + frame.nudge
    ticks = list(dict.fromkeys(frame[by]))
    series = list(dict.fromkeys(frame.series))
    width = 0.8 / max(len(series), 1)
    for i, name in enumerate(series):
        part = frame[frame.series == name].set_index(by).reindex(ticks)
        x = np.arange(len(ticks)) + i * width
        err = np.vstack([part.rate - part.ci_low, part.ci_high - part.rate]).clip(min=0)
        ax.bar(x, part.rate, width, yerr=err, capsize=3, label=name)
        for xi, n in zip(x, part.n, strict=False):
            if not np.isnan(n):
                ax.text(xi, 0.01, f"n={int(n)}", ha="center", va="bottom", fontsize=6, rotation=90)
    long_labels = {} if by == "nudge" else {"rotation": 30, "ha": "right", "fontsize": 7}
    ax.set_xticks(np.arange(len(ticks)) + width * (len(series) - 1) / 2, ticks, **long_labels)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:  # an empty table draws no bars
        ax.legend(fontsize=6)


def write_report(runs: Iterable[str | Path], out: str | Path, echo: Callable[[str], None] = log.info,
                 force: bool = False, calibration: str | Path | None = None) -> list[Path]:
    """Rates (CSV) and figures of one or more eval runs into the report folder OUT, written atomically; with
    `calibration` (a calibration folder of the runs' judge) the misaligned rates are corrected with it."""
    runs = [str(r) for r in runs]
    table = load_runs(runs)
    chosen = None
    if calibration is not None:
        chosen = load_calibration(calibration)
        for judge in table.judge.dropna().unique() if "judge" in table else []:
            chosen.check_judge(str(judge), str(calibration))
    summary = print_summary(table, echo, chosen)
    by_judge = judge_comparisons(runs)
    if by_judge is not None:
        summary["misaligned_by_judge"] = by_judge
        for row in by_judge.to_dict("records"):
            echo(f"  {row['run']} judged by {row['judge']}: {format_rate(row)}")
    with atomic_folder(out, REPORT_KIND, force=force) as tmp:
        written = write_report_files(table, summary, tmp)
        atomic_write_json(tmp / CFG_FILE, {"kind": REPORT_KIND, "format_version": FORMAT_VERSION, "runs": runs,
                                           "files": [p.name for p in written], "versions": versions()})
    return [Path(out) / p.name for p in written]


def write_report_files(table: pd.DataFrame, summary: dict[str, pd.DataFrame], out: Path) -> list[Path]:
    written = []
    for name, frame in summary.items():
        path = out / f"{name}.csv"
        frame.to_csv(path, index=False)
        written.append(path)
    atomic_write_table(table, out / "all_samples.parquet")
    figures = {
        "misaligned_rate.png": ("free_form_misaligned", "P(misaligned) by nudge x model (free-form)"),
        "deception_misaligned_rate.png": ("deception_misaligned", "P(misaligned) by nudge x model (deception sets)"),
        "flip_rate.png": ("factual", "factual recall: flip rate after pushback"),
    }
    for filename, (key, title) in figures.items():
        if key in summary:
            frame = summary[key]
            if key == "factual":
                frame = frame[frame.measure == "flip_rate"]
            written.append(_save(lambda ax, frame=frame, title=title: _bar_with_ci(ax, frame, title), out / filename))
    if "deception_false_rate" in summary:
        title = "deception sets: P(FALSE) among TRUE / FALSE verdicts, by system prompt"
        written.append(_save(lambda ax: _bar_with_ci(ax, summary["deception_false_rate"], title, by="question_id"),
                             out / "deception_false_rate.png", size=(8, 4.5)))
    if "refusal" in summary:
        written.append(_refusal_figure(summary["refusal"], out / "refusal_rate.png"))
    if "harm_vs_misaligned" in summary:
        written.append(_harm_figure(summary["harm_vs_misaligned"], out / "harm_vs_misaligned.png"))
    if "misaligned_by_judge" in summary:
        frame = summary["misaligned_by_judge"].rename(columns={"run": "model_name"})
        frame = frame.assign(intervention="none", nudge="all")
        title = "P(misaligned) of the same answers under each judge (emlens judge compare)"
        written.append(_save(lambda ax: _bar_with_ci(ax, frame, title, by="judge"), out / "misaligned_by_judge.png"))
    return written


def judge_comparisons(runs: Iterable[str]) -> pd.DataFrame | None:
    """The misaligned rate of each run under each judge, where `emlens judge compare` was run on it."""
    rows = []
    for run in runs:
        path = Path(run) / "judge_compare.json"
        if path.is_file():
            rows += [{"run": Path(run).name, **row} for row in read_json(path)["rates"]]
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    return frame.astype({column: float for column in ("rate", "ci_low", "ci_high")})  # JSON's None: NaN


def _save(draw, path: Path, size=(6, 3.5)) -> Path:
    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def _refusal_figure(frame: pd.DataFrame, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, kind in zip(axes, ("harmful", "harmless"), strict=False):
        part = frame[(frame.prompts == kind) & (frame.measure == "refused_judge")]
        if len(part):
            _bar_with_ci(ax, part, f"refusal rate (judge), {kind} prompts")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def _harm_figure(frame: pd.DataFrame, path: Path) -> Path:
    def draw(ax):
        frame_ = frame.assign(series=frame.model_name + " | " + frame.nudge)
        for name, part in frame_.groupby("series"):
            ax.scatter(part.perceived_harm, part.p_misaligned, s=12, label=name)
        if frame.perceived_harm.nunique() > 1:
            slope, intercept = np.polyfit(frame.perceived_harm, frame.p_misaligned, 1)
            xs = np.linspace(frame.perceived_harm.min(), frame.perceived_harm.max(), 20)
            ax.plot(xs, slope * xs + intercept, "k--", lw=1, label=f"fit: slope {slope:.4f}")
        ax.set_xlabel("perceived harm (model's own rating, 0-100)")
        ax.set_ylabel("P(misaligned)")
        ax.set_title("perceived harm vs P(misaligned), one point per question", fontsize=9)
        ax.legend(fontsize=6)

    return _save(draw, path)


@register_artifact(REPORT_KIND)
def open_report(folder: Path) -> dict[str, pd.DataFrame]:
    """`em.load(OUT)` of `emlens eval report`: its rate tables by name."""
    return {path.stem: pd.read_csv(path) for path in sorted(Path(folder).glob("*.csv"))}
