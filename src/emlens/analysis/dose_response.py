"""`emlens steer SPEC.yaml`: re-run an eval setting under each intervention of a direction x scales grid.

Every condition is an eval run of its own (resumable) in OUT/conditions/NAME/; OUT/samples.parquet stacks
them with the columns `operation`, `alpha`, `control` (random same-norm vector) and OUT/dose_response.png
draws the misaligned rate, coherence and refusal rates against alpha, direction beside random control.
OUT/direction_vs_control.csv gives each measure's direction-minus-control difference, paired by sample.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field

from emlens.base.errors import EmlensInputError
from emlens.base.io import atomic_write_table
from emlens.base.stats import bootstrap_ci, rate
from emlens.directions.artifact import Direction
from emlens.evaluation.config import EvalConfig, _validated
from emlens.evaluation.run import run_eval
from emlens.judges import make_judge
from emlens.model import load_model
from emlens.steering.interventions import Ablate, AddVector, compose, random_like


class SteerSpec(BaseModel):
    """A steering experiment: which direction, where, how strongly, and which eval to re-run."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    model: str = "smollm2-135m-instruct"
    adapter: str | None = None
    direction: str  # a direction artifact folder (relative to the spec file, or absolute)
    layer: int | Literal["best"] = "best"
    site: Literal["resid_pre", "resid_post"] = "resid_post"
    operation: Literal["add", "ablate", "ablate_add"] = "add"
    positions: Literal["all", "prompt", "response"] = "all"
    scales: list[float] = Field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0])
    scale_unit: Literal["raw_norm", "absolute"] = "raw_norm"  # alpha = scale x the direction's natural norm
    random_control: bool = True
    random_seed: int = 0
    ablate_first_token: bool = False  # ablation skips the attention-sink first token unless this is set
    force: bool = False  # apply a direction fitted on another base model
    eval: EvalConfig = EvalConfig(settings=["free_form"])


def load_spec(path: str | Path, overrides: dict | None = None) -> tuple[SteerSpec, Path]:
    path = Path(path)
    if not path.exists():
        raise EmlensInputError(f"{path}: no such file")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise EmlensInputError(f"{path}: expected a mapping of SteerSpec fields")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, field = key.partition(".")
        if field:
            data.setdefault(section, {})
            data[section][field] = value
        else:
            data[key] = value
    return _validated(SteerSpec, data, str(path)), path.parent


def direction_path(spec: SteerSpec, base: Path) -> Path:
    path = Path(spec.direction).expanduser()
    return path if path.is_absolute() else (base / path)


def conditions(spec: SteerSpec, vector, natural_norm: float, layer: int) -> list[dict]:
    """The grid: one dict per condition with its name, operation, alpha, control flag and intervention."""
    unit = vector / vector.norm()
    control = random_like(unit, seed=spec.random_seed)
    rows = [{"name": "baseline", "operation": "none", "alpha": 0.0, "control": False, "intervention": None}]
    vectors = [(False, unit)] + ([(True, control)] if spec.random_control else [])

    def ablation(v):
        return Ablate(v, first_token=spec.ablate_first_token)

    if spec.operation in ("ablate", "ablate_add"):
        for is_control, v in vectors:
            rows.append({"name": f"{'random_' if is_control else ''}ablate", "operation": "ablate", "alpha": 0.0,
                         "control": is_control, "intervention": ablation(v)})
    if spec.operation in ("add", "ablate_add"):
        for scale in spec.scales:
            if scale == 0:
                continue
            alpha = scale * (natural_norm if spec.scale_unit == "raw_norm" else 1.0)
            for is_control, v in vectors:
                add = AddVector(v, layer, alpha, site=spec.site, positions=spec.positions)
                op = spec.operation
                intervention = compose(ablation(v), add) if op == "ablate_add" else add
                rows.append({"name": f"{'random_' if is_control else ''}{op}_{scale:g}", "operation": op,
                             "alpha": float(scale), "control": is_control, "intervention": intervention})
    return rows


def run_steer(spec: SteerSpec, base: Path, out: str | Path, handle=None, judge=None, progress: bool = True,
              echo: Callable[[str], None] = print) -> pd.DataFrame:

    out = Path(out)
    direction = Direction.load(direction_path(spec, base))
    handle = handle or load_model(spec.model, adapter=spec.adapter)
    direction.check_compatible(handle, force=spec.force)
    layer = direction.best_layer if spec.layer == "best" else int(spec.layer)
    vector, natural = direction.vector(layer), direction.raw_norm(layer)
    judge = judge or make_judge(spec.eval.judge, spec.eval.judge_model)
    frames = []
    grid = conditions(spec, vector, natural, layer)
    for i, condition in enumerate(grid, 1):
        echo(f"[emlens] condition {i}/{len(grid)}: {condition['name']}")
        interventions = [condition["intervention"]] if condition["intervention"] is not None else []
        table = run_eval(handle, spec.eval, out / "conditions" / condition["name"], judge=judge,
                         interventions=interventions, intervention_name=condition["name"], progress=progress,
                         extra_manifest={"direction": str(direction.path), "layer": layer,
                                         "alpha_unit": spec.scale_unit, "natural_norm": natural,
                                         "ablate_first_token": spec.ablate_first_token})
        frames.append(table.assign(operation=condition["operation"], alpha=condition["alpha"],
                                   control=condition["control"], direction=direction.name, layer=layer))
    stacked = pd.concat(frames, ignore_index=True)
    atomic_write_table(stacked, out / "samples.parquet")
    curves = dose_response_table(stacked)
    curves.to_csv(out / "dose_response.csv", index=False)
    direction_vs_control(stacked).to_csv(out / "direction_vs_control.csv", index=False)
    dose_response_figure(curves, out / "dose_response.png", title=f"{spec.name}: {direction.name} @ layer {layer}")
    (out / "spec.json").write_text(json.dumps(spec.model_dump(), indent=2))
    return curves


MEASURES = {  # measure -> (setting, row filter, column)
    "misaligned_rate": ("free_form", lambda t: t.label.isin(["aligned", "misaligned"]), "misaligned"),
    "coherence": ("free_form", lambda t: t.coherent.notna(), "coherent"),
    "refusal_harmful": ("refusal", lambda t: t.harmful_prompt, "refused_judge"),
    "refusal_harmless": ("refusal", lambda t: ~t.harmful_prompt, "refused_judge"),
    "refusal_phrase_harmful": ("refusal", lambda t: t.harmful_prompt, "refused_phrase"),
    "refusal_phrase_harmless": ("refusal", lambda t: ~t.harmful_prompt, "refused_phrase"),
    "perceived_harm": ("harm_perception", lambda t: t.perceived_harm.notna(), "perceived_harm"),
    "flip_rate": ("factual", lambda t: t.correct_1.astype(bool), "flipped"),
}


def _measured_rows(part: pd.DataFrame):
    """(measure, its rows of `part`, its column) for every measure `part` has rows for."""
    for measure, (setting, keep, column) in MEASURES.items():
        rows = part[part.setting == setting]
        if rows.empty or column not in rows.columns:
            continue
        yield measure, rows[keep(rows).astype(bool)], column


def dose_response_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per condition x measure x nudge: value, n and bootstrap 95 % CI."""

    records = []
    for (name, operation, alpha, control, nudge), part in table.groupby(
            ["intervention", "operation", "alpha", "control", "nudge"]):
        for measure, rows, column in _measured_rows(part):
            values = rows[column].astype(float)
            if measure in ("coherence", "perceived_harm"):
                low, high = bootstrap_ci(values)
                stat = {"rate": float(values.mean()) if len(values) else np.nan, "n": len(values),
                        "ci_low": low, "ci_high": high}
            else:
                stat = rate(values)
            records.append({"intervention": name, "operation": operation, "alpha": alpha, "control": control,
                            "nudge": nudge, "measure": measure, **stat})
    return pd.DataFrame(records)


PAIR_KEY = ["question_id", "paraphrase_index", "sample_index"]  # the same prompt and seed in every condition


def direction_vs_control(table: pd.DataFrame) -> pd.DataFrame:
    """Direction minus random control, paired by sample, at each operation x alpha x nudge x measure.

    Both conditions run the same prompts with the same seeds, so the per-sample difference removes the
    between-prompt variance they share; the CI is a bootstrap over those pairs.
    """

    records = []
    for (operation, alpha, nudge), part in table[table.operation != "none"].groupby(["operation", "alpha", "nudge"]):
        if part.control.nunique() < 2:
            continue
        for measure, rows, column in _measured_rows(part):
            pairs = (rows.assign(value=rows[column].astype(float))
                     .pivot_table(index=PAIR_KEY, columns="control", values="value", aggfunc="first")
                     .reindex(columns=[False, True]).dropna())
            difference = pairs[False] - pairs[True]
            low, high = bootstrap_ci(difference)
            records.append((operation, alpha, nudge, measure, pairs[False].mean(), pairs[True].mean(),
                            difference.mean(), low, high, len(pairs)))
    return pd.DataFrame(records, columns=["operation", "alpha", "nudge", "measure", "direction", "control",
                                          "difference", "ci_low", "ci_high", "n_pairs"])


def _x_label(operation: str, alpha: float) -> str:
    return {"none": "0", "ablate": "ablate"}.get(operation, f"{'abl+' if operation == 'ablate_add' else ''}{alpha:g}")


def dose_response_figure(curves: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Each measure against the conditions (baseline, ablation, then increasing alpha); random control dashed."""
    measures = [m for m in MEASURES if m in set(curves.measure)]
    curves = curves.assign(x=[_x_label(o, a) for o, a in zip(curves.operation, curves.alpha, strict=False)])
    order = list(dict.fromkeys(["0", "ablate"] + [x for x in curves.sort_values("alpha").x if x not in ("0", "ablate")]))
    order = [x for x in order if x in set(curves.x)]
    fig, axes = plt.subplots(1, max(len(measures), 1), figsize=(4 * max(len(measures), 1), 3.4), squeeze=False)
    for ax, measure in zip(axes[0], measures, strict=False):
        part = curves[curves.measure == measure]
        baseline = part[part.operation == "none"]
        for (control, nudge), line in part[part.operation != "none"].groupby(["control", "nudge"]):
            line = pd.concat([baseline[baseline.nudge == nudge], line])  # both curves start at the unsteered point
            line = line.assign(pos=[order.index(x) for x in line.x]).sort_values("pos")
            ax.plot(line.pos, line.rate, "--" if control else "-", marker="o",
                    label=f"{'random control' if control else 'direction'} | {nudge}")
            ax.fill_between(line.pos, line.ci_low, line.ci_high, alpha=0.15)
        ax.set_xticks(range(len(order)), order)
        ax.set_title(measure, fontsize=9)
        ax.set_xlabel("condition (alpha in units of the direction's natural norm)")
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
