"""Monitoring: project the activations of an eval table onto a direction and correlate with behaviour.

Persona-vector style: the projection of each sample's mean response activation (or last prompt token) onto
the direction, against a behavioural column (misaligned, aligned score, refusal, ...), with Pearson r and its
95 % CI, beside the same statistic for a random same-norm direction.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from emlens.base.io import fail
from emlens.base.stats import pearson_ci
from emlens.capture.backends import DEFAULT_BACKEND
from emlens.capture.extract import extract_activations
from emlens.capture.items import items_from_run_table
from emlens.directions.artifact import Direction
from emlens.generation.engine import DEFAULT_BATCH_SIZE
from emlens.model import Model
from emlens.sites import site_name
from emlens.steering.interventions import random_like

MONITOR_POSITIONS = ("mean_response", "last_prompt")  # one vector per sample


def monitor(handle: Model, table: pd.DataFrame, direction: Direction, target: str = "misaligned", layer: int | None = None,
            position: str = "mean_response", setting: str | None = "free_form", batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
            force: bool = False, progress: bool = False, backend: str = DEFAULT_BACKEND) -> dict:
    """r(projection onto the direction, target column) over the table's rows, and the random-control r.

    `setting` keeps the rows of one eval setting (None or "": every row); `position` is `mean_response` (the
    mean over the response tokens; rows without a response are left out) or `last_prompt`.
    """
    if position not in MONITOR_POSITIONS:
        raise fail(f"position '{position}'", f"monitor needs one vector per sample: {' or '.join(MONITOR_POSITIONS)}")
    if target not in table.columns:
        raise fail("table", f"no column '{target}' to correlate with (columns: {', '.join(table.columns[:20])})")
    direction.check_compatible(handle, force=force)
    rows = table
    if setting and "setting" in rows.columns:
        rows = rows[rows.setting == setting]
    rows = rows[rows[target].notna()].reset_index(drop=True)
    if position == "mean_response":
        rows = rows[rows.response.astype(str).str.len() > 0].reset_index(drop=True)
    if rows.empty:
        raise fail("table", f"no rows to monitor (setting {setting or 'any'}, a '{target}' value"
                            f"{', a response' if position == 'mean_response' else ''})")
    layer = direction.best_layer if layer is None else layer
    site = site_name(layer, direction.site_kind)
    acts = extract_activations(handle, items_from_run_table(rows, with_response=position != "last_prompt"), [site],
                               position=position, backend=backend, batch_size=batch_size,
                               progress=progress)[site].float()
    vector = direction.vector(layer).float()
    projection = (acts @ vector).numpy()
    control = (acts @ (random_like(vector, seed) / vector.norm())).numpy()
    y = rows[target].astype(float).to_numpy()
    return {"target": target, "layer": layer, "site": site, "position": position,
            **{k: v for k, v in pearson_ci(projection, y).items()},
            **{f"random_{k}": v for k, v in pearson_ci(control, y).items() if k != "n"},
            "projections": projection}


def print_monitor(result: dict, echo: Callable[[str], None] = print) -> None:
    echo(f"projection on {result['site']} ({result['position']}) vs {result['target']}: "
         f"r={result['r']:.3f} [{result['ci_low']:.3f}, {result['ci_high']:.3f}] n={result['n']}; "
         f"random direction r={result['random_r']:.3f} [{result['random_ci_low']:.3f}, {result['random_ci_high']:.3f}]")
    echo(" ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in result.items()
                  if k != "projections" and not isinstance(v, np.ndarray)))
