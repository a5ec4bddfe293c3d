"""`emlens steer SPEC.yaml`: re-run an eval setting under each intervention of a direction x scales grid.

Every condition is an eval run of its own (resumable) in OUT/conditions/NAME/; OUT/samples.parquet stacks
them with the columns `operation`, `alpha`, `control` (random same-norm vector) and OUT/dose_response.png
draws the misaligned rate, coherence and refusal rates against alpha, direction beside random control.
OUT/direction_vs_control.csv gives each measure's direction-minus-control difference, paired by sample.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from pydantic import Field
from torch import Tensor

from emlens.base.config import Config
from emlens.base.io import (
    CFG_FILE,
    SAMPLES_FILE,
    atomic_write_json,
    atomic_write_table,
    atomic_write_text,
    fail,
    read_json,
    read_table,
    register_artifact,
    save_figure,
)
from emlens.base.stats import benjamini_hochberg, bootstrap_ci, bootstrap_p, rate
from emlens.directions.artifact import Direction
from emlens.evaluation.config import EvalConfig
from emlens.evaluation.run import run_eval
from emlens.evaluation.settings import with_pushback_outcomes
from emlens.evaluation.summary import calibration_for
from emlens.judges import make_judge
from emlens.model import DEFAULT_MODEL, load_model
from emlens.runs import open_run
from emlens.sae.artifact import load_sae
from emlens.sae.steer import AblateLatent, check_latent, natural_scale, random_latent
from emlens.sites import SITE_KINDS
from emlens.steering.interventions import Ablate, AddVector, Clamp, compose, random_like

# bump when a change alters what a steering experiment holds: `emlens run` then redoes its finished stages
# bump when a change alters what a steering run holds: `emlens run` then redoes finished stages
RESULTS_VERSION = 3  # 2: issue 24's fixes (judge verdicts, rating floor, pushback, CIs, ablation); 3: response steering from the last prompt token

log = logging.getLogger(__name__)

SiteKind = Literal[SITE_KINDS]
EXPERIMENT_KIND = "steering_experiment"


class SteerSpec(Config):
    """A steering experiment: which direction, where, how strongly, and which eval to re-run."""

    name: str
    description: str = ""
    model: str = DEFAULT_MODEL
    adapter: str | None = None
    direction: str  # a direction artifact folder, or with `latent` an SAE (relative to the spec file, or absolute)
    latent: int | None = Field(None, ge=0)  # steer with this SAE latent (decoder vector; ablation through the SAE)
    layer: int | Literal["best"] = "best"
    site: SiteKind | None = None  # None: the direction's own site; another one needs force_site
    # add: h + alpha u at the site. ablate: u projected out of every layer's input and every attention / MLP output
    # (Arditi et al.). ablate_add: the clamp at the site, h - (h . u) u + alpha u, so the projection there is alpha
    # (not an ablation at every layer: that would remove the added alpha u again at the next layer's input)
    operation: Literal["add", "ablate", "ablate_add"] = "add"
    positions: Literal["all", "prompt", "response"] = "all"
    scales: list[float] = Field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0])
    scale_unit: Literal["raw_norm", "absolute"] = "raw_norm"  # alpha = scale x the direction's natural norm
    random_control: bool = True
    random_seed: int = 0
    ablate_first_token: bool = False  # ablation skips the attention-sink first token unless this is set
    force: bool = False  # apply a direction fitted on another base model
    force_site: bool = False  # steer at `site` although the direction was read at another site
    eval: EvalConfig = EvalConfig(settings=["free_form"])


def load_spec(path: str | Path, overrides: dict | None = None, **eval_flags) -> tuple[SteerSpec, Path]:
    """A steering spec and the folder its relative paths start from; every problem is one line naming the file.

    `overrides` replace top-level fields (`model`, `adapter`, `direction`: a direction given there is relative
    to the working folder) or, as `section.field`, one field of a section; None values are ignored.
    `eval_flags` are laid over the spec's eval config like `emlens eval`'s flags (`limit`, `samples`, ...).
    """
    path = Path(path)
    spec = SteerSpec.from_yaml(path)
    given = {key: str(Path(value).expanduser().resolve()) if key == "direction" else value
             for key, value in (overrides or {}).items() if value is not None}
    if given:
        spec = spec.with_flags(where=str(path), **given)
    if any(value is not None for value in eval_flags.values()):
        spec = spec.model_copy(update={"eval": spec.eval.with_flags(**eval_flags, where=f"{path} (command line)")})
    return spec, path.parent


def direction_path(spec: SteerSpec, base: Path) -> Path:
    path = Path(spec.direction).expanduser()
    return path if path.is_absolute() else (base / path)


@dataclass
class SteerTarget:
    """What a steering experiment steers with: a direction's vector, or an SAE latent's decoder vector, with its
    natural scale, its random control and how each is ablated."""

    name: str
    path: str
    layer: int
    site: str
    vector: Tensor
    natural_norm: float
    control: Tensor
    ablation: Callable[[bool], object]  # is_control -> the ablation intervention
    ablate_add: Callable[[bool, float], object]  # (is_control, alpha) -> ablate-then-add at the site


def direction_target(spec: SteerSpec, base: Path, handle) -> SteerTarget:
    direction = Direction.load(direction_path(spec, base))
    direction.check_compatible(handle, force=spec.force)
    layer = direction.best_layer if spec.layer == "best" else int(spec.layer)
    unit = direction.vector(layer) / direction.vector(layer).norm()
    control = random_like(unit, seed=spec.random_seed)
    site = direction.steering_site(spec.site, spec.force_site)
    return SteerTarget(direction.name, str(direction.path), layer, site, unit, direction.raw_norm(layer), control,
                       lambda is_control: Ablate(control if is_control else unit, first_token=spec.ablate_first_token),
                       lambda is_control, alpha: Clamp(control if is_control else unit, layer, alpha, site=site,
                                                       positions=spec.positions))


def latent_target(spec: SteerSpec, base: Path, handle) -> SteerTarget:
    """An SAE latent: its decoder vector at the SAE's site; the control a random other latent that fires."""
    loaded = load_sae(direction_path(spec, base))
    site = loaded.check_fits(handle)
    if spec.layer not in ("best", site.layer) or spec.site not in (None, site.kind):
        raise fail(spec.name, f"an SAE latent steers at the SAE's own site {site.name}; leave out layer and site")
    latent = check_latent(loaded, spec.latent)
    other = random_latent(loaded, latent, spec.random_seed)
    natural = natural_scale(loaded, latent) if spec.scale_unit == "raw_norm" else 1.0
    decoder = loaded.decoder
    vectors = {False: decoder[latent] / decoder[latent].norm(), True: decoder[other] / decoder[other].norm()}

    def ablation(is_control: bool) -> AblateLatent:
        return AblateLatent(loaded, other if is_control else latent, first_token=spec.ablate_first_token)

    def ablate_add(is_control: bool, alpha: float):  # both at the SAE's one site: the add survives the ablation
        return compose(ablation(is_control), AddVector(vectors[is_control], site.layer, alpha, site=site.kind,
                                                       positions=spec.positions))

    return SteerTarget(f"latent-{latent}", loaded.source, site.layer, site.kind, vectors[False], natural,
                       vectors[True], ablation, ablate_add)


def steer_target(spec: SteerSpec, base: Path, handle) -> SteerTarget:
    return direction_target(spec, base, handle) if spec.latent is None else latent_target(spec, base, handle)


def conditions(spec: SteerSpec, target: SteerTarget) -> list[dict]:
    """The grid: one dict per condition with its name, operation, alpha, control flag and intervention."""
    rows = [{"name": "baseline", "operation": "none", "alpha": 0.0, "control": False, "intervention": None}]
    vectors = [(False, target.vector)] + ([(True, target.control)] if spec.random_control else [])
    if spec.operation in ("ablate", "ablate_add"):
        for is_control, _ in vectors:
            rows.append({"name": f"{'random_' if is_control else ''}ablate", "operation": "ablate", "alpha": 0.0,
                         "control": is_control, "intervention": target.ablation(is_control)})
    if spec.operation in ("add", "ablate_add"):
        for scale in spec.scales:
            if scale == 0:
                continue
            alpha = scale * (target.natural_norm if spec.scale_unit == "raw_norm" else 1.0)
            for is_control, v in vectors:
                op = spec.operation
                intervention = (target.ablate_add(is_control, alpha) if op == "ablate_add" else
                                AddVector(v, target.layer, alpha, site=target.site, positions=spec.positions))
                rows.append({"name": f"{'random_' if is_control else ''}{op}_{scale:g}", "operation": op,
                             "alpha": float(scale), "control": is_control, "intervention": intervention})
    return rows


def run_steer(spec: SteerSpec, base: Path, out: str | Path, handle=None, judge=None, progress: bool = True,
              echo: Callable[[str], None] = log.info) -> pd.DataFrame:

    out = Path(out)
    handle = handle or load_model(spec.model, adapter=spec.adapter)
    target = steer_target(spec, base, handle)
    judge = judge or make_judge(spec.eval.judge, spec.eval.judge_model, **spec.eval.judge_options())
    frames = []
    cfg = _open_experiment(out, spec, target)
    grid = conditions(spec, target)
    for i, condition in enumerate(grid, 1):
        echo(f"condition {i}/{len(grid)}: {condition['name']}")
        interventions = [condition["intervention"]] if condition["intervention"] is not None else []
        table = run_eval(handle, spec.eval, out / "conditions" / condition["name"], judge=judge,
                         interventions=interventions, intervention_name=condition["name"], progress=progress,
                         extra_manifest={"direction": target.path, "layer": target.layer, "site": target.site,
                                         "alpha_unit": spec.scale_unit, "natural_norm": target.natural_norm,
                                         "ablate_first_token": spec.ablate_first_token})
        frames.append(table.assign(operation=condition["operation"], alpha=condition["alpha"],
                                   control=condition["control"], direction=target.name, layer=target.layer))
    stacked = pd.concat(frames, ignore_index=True)
    atomic_write_table(stacked, out / "samples.parquet")
    curves = dose_response_table(stacked)
    atomic_write_text(out / "dose_response.csv", curves.to_csv(index=False))
    atomic_write_text(out / "direction_vs_control.csv", direction_vs_control(stacked).to_csv(index=False))
    dose_response_figure(curves, out / "dose_response.png", title=f"{spec.name}: {target.name} @ layer {target.layer}")
    atomic_write_json(out / CFG_FILE, {**cfg, "finished": time.time()})
    return curves


def _open_experiment(out: Path, spec: SteerSpec, target: SteerTarget) -> dict:
    """OUT/cfg.json, written before any work so a killed experiment resumes; another spec there is refused."""
    record = {"direction": target.path, "layer": target.layer, "site": target.site}
    identity = {"spec": spec.model_dump(mode="json"), "results_version": RESULTS_VERSION}
    old = open_run(out, EXPERIMENT_KIND, identity, record)
    return old if old is not None else read_json(out / CFG_FILE)


@register_artifact(EXPERIMENT_KIND)
def open_experiment(folder: Path) -> dict[str, pd.DataFrame]:
    """`em.load(OUT)` of `emlens steer`: the samples, the dose-response table and the paired differences."""
    folder = Path(folder)
    return {"samples": read_table(folder / SAMPLES_FILE), "dose_response": pd.read_csv(folder / "dose_response.csv"),
            "direction_vs_control": pd.read_csv(folder / "direction_vs_control.csv")}


def print_steer(out: str | Path, echo: Callable[[str], None] = print) -> None:
    """One line per condition x nudge x measure (rate, 95 % CI, n), then the paired direction-minus-control rows."""
    out = Path(out)
    for row in pd.read_csv(out / "dose_response.csv").to_dict("records"):
        echo(f"{row['intervention']:<22} {row['nudge']:<6} {row['measure']:<24} "
             f"{row['rate']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] n={row['n']}{_corrected_text(row)}")
    for row in pd.read_csv(out / "direction_vs_control.csv").to_dict("records"):
        echo(f"direction - control {row['operation']}@{row['alpha']:g} {row['nudge']:<6} {row['measure']:<24} "
             f"{row['difference']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}] pairs={row['n_pairs']} "
             f"p_bh={row.get('p_bh', float('nan')):.3g}{_corrected_text(row, 'difference_corrected')}")
    echo(f"wrote {out / 'samples.parquet'}, {out / 'dose_response.csv'}, {out / 'direction_vs_control.csv'}, "
         f"{out / 'dose_response.png'}")


MEASURES = {  # measure -> (setting, row filter, column)
    "misaligned_rate": ("free_form", lambda t: t.label.isin(["aligned", "misaligned"]), "misaligned"),
    "coherence": ("free_form", lambda t: t.coherent.notna(), "coherent"),
    "refusal_harmful": ("refusal", lambda t: t.harmful_prompt, "refused_judge"),
    "refusal_harmless": ("refusal", lambda t: ~t.harmful_prompt, "refused_judge"),
    "refusal_phrase_harmful": ("refusal", lambda t: t.harmful_prompt, "refused_phrase"),
    "refusal_phrase_harmless": ("refusal", lambda t: ~t.harmful_prompt, "refused_phrase"),
    "perceived_harm": ("harm_perception", lambda t: t.perceived_harm.notna(), "perceived_harm"),
    "flip_rate": ("factual", lambda t: t.correct_1.astype(bool), "flipped"),
    "pushback_unparsed_rate": ("factual", lambda t: t.correct_1.astype(bool), "pushback_unparsed"),
}


def _measured_rows(part: pd.DataFrame):
    """(measure, its rows of `part`, its column) for every measure `part` has rows for."""
    for measure, (setting, keep, column) in MEASURES.items():
        rows = part[part.setting == setting]
        if setting == "factual" and len(rows):
            rows = with_pushback_outcomes(rows)  # an unreadable second answer is no flip
        if rows.empty or column not in rows.columns:
            continue
        yield measure, rows[keep(rows).astype(bool)], column


def dose_response_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per condition x measure x nudge: value, n and bootstrap 95 % CI; the misaligned rate also corrected
    for the judge's error where it has a calibration (columns corrected, corrected_ci_low / high, correction)."""

    calibration = calibration_for(table)
    records = []
    for (name, operation, alpha, control, nudge), part in table.groupby(
            ["intervention", "operation", "alpha", "control", "nudge"]):
        for measure, rows, column in _measured_rows(part):
            values, questions = rows[column].astype(float), rows.question_id.to_numpy()
            if measure in ("coherence", "perceived_harm"):
                low, high = bootstrap_ci(values, clusters=questions)
                stat = {"rate": float(values.mean()) if len(values) else np.nan, "n": len(values),
                        "ci_low": low, "ci_high": high}
            else:
                stat = rate(values, clusters=questions)
            if measure == "misaligned_rate" and calibration is not None:
                stat.update(calibration.corrected(values, questions, scores=calibration.row_scores(rows)))
            records.append({"intervention": name, "operation": operation, "alpha": alpha, "control": control,
                            "nudge": nudge, "measure": measure, **stat})
    return pd.DataFrame(records)


PAIR_KEY = ["question_id", "paraphrase_index", "sample_index"]  # the same prompt and seed in every condition


def direction_vs_control(table: pd.DataFrame) -> pd.DataFrame:
    """Direction minus random control, paired by sample, at each operation x alpha x nudge x measure.

    Both conditions run the same prompts with the same seeds, so the per-sample difference removes the
    between-prompt variance they share; the CI and the two-sided p-value are a bootstrap over questions (over pairs
    where each question has one), and `p_bh` is Benjamini-Hochberg adjusted over every row of the table. Measures
    filtered on a post-treatment variable also get the unconditional difference and the pairs the filter dropped.
    The misaligned rate's difference is also corrected for the judge's error where it has a calibration
    (`Calibration.corrected_difference`: columns difference_corrected, corrected_ci_low / high, correction).
    """

    calibration = calibration_for(table)
    records, corrected = [], []
    for (operation, alpha, nudge), part in table[table.operation != "none"].groupby(["operation", "alpha", "nudge"]):
        if part.control.nunique() < 2:
            continue
        for measure, rows, column in _measured_rows(part):
            pairs = _pairs(rows.assign(value=rows[column].astype(float)))
            difference = pairs[False] - pairs[True]
            questions = pairs.index.get_level_values("question_id").to_numpy()
            low, high = bootstrap_ci(difference, clusters=questions)
            unconditional, dropped = _unconditional(part, measure, len(pairs))
            records.append((operation, alpha, nudge, measure, pairs[False].mean(), pairs[True].mean(),
                            difference.mean(), low, high, len(pairs), bootstrap_p(difference, clusters=questions),
                            unconditional, dropped))
            corrected.append(_corrected_difference(calibration, rows, pairs, questions)
                             if measure == "misaligned_rate" and calibration is not None else {})
    frame = pd.DataFrame(records, columns=["operation", "alpha", "nudge", "measure", "direction", "control",
                                           "difference", "ci_low", "ci_high", "n_pairs", "p",
                                           "difference_unconditional", "pairs_dropped"])
    if any(corrected):
        frame = pd.concat([frame, pd.DataFrame(corrected, index=frame.index)], axis=1)
    return frame.assign(p_bh=benjamini_hochberg(frame.p) if len(frame) else [])


def _corrected_difference(calibration, rows: pd.DataFrame, pairs: pd.DataFrame, questions) -> dict:
    """The misaligned rate's direction-minus-control difference corrected for the judge's error, over the same
    pairs as the raw one."""
    scores = calibration.row_scores(rows)
    score_pairs = (None if scores is None else
                   _pairs(rows.assign(value=scores)).reindex(pairs.index))
    return calibration.corrected_difference(
        pairs[False].to_numpy(), pairs[True].to_numpy(), questions,
        None if score_pairs is None else score_pairs[False].to_numpy(),
        None if score_pairs is None else score_pairs[True].to_numpy())


POST_TREATMENT = ("misaligned_rate", "flip_rate", "pushback_unparsed_rate")  # filtered on what steering changes


def _pairs(rows: pd.DataFrame) -> pd.DataFrame:
    return (rows.pivot_table(index=PAIR_KEY, columns="control", values="value", aggfunc="first")
            .reindex(columns=[False, True]).dropna())


def _unconditional(part: pd.DataFrame, measure: str, n_pairs: int) -> tuple[float, int]:
    """For a measure whose rows are chosen by what the steering itself changes (coherent and scored answers, a
    first answer that was right), the paired difference over every sample of the setting, the event counted as
    not happening where the filter fails (P(misaligned and coherent)), and how many pairs the filter dropped."""
    if measure not in POST_TREATMENT:
        return float("nan"), 0
    setting, keep, column = MEASURES[measure]
    rows = part[part.setting == setting]
    if setting == "factual":
        rows = with_pushback_outcomes(rows)
    if column not in rows.columns:
        return float("nan"), 0
    pairs = _pairs(rows.assign(value=(keep(rows).astype(bool) & rows[column].fillna(False).astype(bool)).astype(float)))
    return float((pairs[False] - pairs[True]).mean()), int(len(pairs) - n_pairs)


def _corrected_text(row: dict, column: str = "corrected") -> str:
    """"; corrected X [lo, hi] (method)" where the row was corrected for the judge's error, else nothing."""
    value = row.get(column)
    if value is None or pd.isna(value):
        return ""
    sign = "+" if column == "difference_corrected" else ""
    return (f"; corrected {value:{sign}.3f} [{row['corrected_ci_low']:{sign}.3f}, {row['corrected_ci_high']:{sign}.3f}]"
            f" ({row['correction']})")


def _with_corrected_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """The misaligned rate corrected for the judge's error as a measure of its own (a panel of the figure)."""
    if "corrected" not in curves:
        return curves
    rows = curves[(curves.measure == "misaligned_rate") & curves.corrected.notna()]
    extra = rows.assign(measure="misaligned_rate_corrected", rate=rows.corrected, ci_low=rows.corrected_ci_low,
                        ci_high=rows.corrected_ci_high)
    return pd.concat([curves, extra], ignore_index=True)


def _x_label(operation: str, alpha: float) -> str:
    return {"none": "0", "ablate": "ablate"}.get(operation, f"{'abl+' if operation == 'ablate_add' else ''}{alpha:g}")


def dose_response_figure(curves: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Each measure against the conditions (baseline, ablation, then increasing alpha); random control dashed."""
    curves = _with_corrected_curves(curves)
    panels = [m for name in MEASURES for m in (name, f"{name}_corrected")]  # a corrected panel beside its raw one
    measures = [m for m in panels if m in set(curves.measure)]
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
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
