"""One figure per direction with every model overlaid: the held-out metric by layer (AUROC, or R^2 for a
regression onto a score) of each model's fit, beside the same fit on shuffled labels as a grey band (the range
over the shuffles of every model), with each fit's n in the legend."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from emlens.base.io import save_figure
from emlens.directions.artifact import Direction


def metric_of(metrics: pd.DataFrame) -> str:
    return "r2" if "r2" in metrics else "auroc"


def layer_metrics_figure(directions: dict[str, Direction], path: Path, title: str) -> Path:
    """`directions`: model (or checkpoint) name -> its fitted direction of one probe spec."""
    tables = {name: d.metrics() for name, d in directions.items() if not d.metrics().empty}
    key = metric_of(next(iter(tables.values())))
    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    band = pd.concat([t[["layer", f"{key}_null_low", f"{key}_null_high"]] for t in tables.values()
                      if f"{key}_null_low" in t], ignore_index=True)
    if not band.empty:
        band = band.groupby("layer").agg(low=(f"{key}_null_low", "min"), high=(f"{key}_null_high", "max"))
        ax.fill_between(band.index, band.low, band.high, color="0.85", label="shuffled labels (range)")
    for name, table in tables.items():
        ax.plot(table["layer"], table[key], marker="o", ms=2.5, lw=1.2, label=f"{name} (n={int(table['n'].iloc[0])})")
    if key == "auroc":
        ax.axhline(0.5, color="0.5", lw=0.6, ls=":")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"held-out {key.upper() if key == 'auroc' else 'R²'}")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
