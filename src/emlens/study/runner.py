"""The one runner: a plan is a list of typed stages, each run into its folder unless its result is there already.

`emlens run` plans a study's stages (study/stages.py); the battery (study/battery.py) plans one stage per model and
measure for the mixture study and the loop. Both run them here: in order, each skipped when its folder holds its
result (`Stage.done`: the one rule, `base.io.finished`, and the measure's own `up_to_date`), one model in memory at
a time (loaded when a stage first needs it), each judge built once, and one record per stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emlens.analysis import compare
from emlens.base.io import CFG_FILE, atomic_write_json, content_hash, finished, read_json
from emlens.base.version import __version__
from emlens.directions import probe
from emlens.evaluation import run as eval_run
from emlens.evaluation.measures import MEASURES
from emlens.evaluation.run import run_eval
from emlens.judges import make_judge
from emlens.judges.identity import judge_identity
from emlens.model import Model, load_model
from emlens.study.steer import RESULTS_VERSION as STEER_RESULTS_VERSION
from emlens.training import trainer

TIMINGS_FILE = "timings.json"
RESULTS_VERSIONS = {"train": trainer.RESULTS_VERSION, "eval": eval_run.RESULTS_VERSION,
                    "direction": probe.RESULTS_VERSION, "steer": STEER_RESULTS_VERSION,
                    "compare": compare.RESULTS_VERSION}  # and each registered measure's own


JUDGE_KEY = "judged_by"  # an eval stage's cfg.json: the identity of the judge its labels came from


def judged_by(config) -> dict:
    """What an eval config's judge labels depend on, known before it is built (strings only: equal after JSON)."""
    return judge_identity(config.judge, config.judge_model, config.judge_mode, config.judge_samples)


def results_version(kind: str) -> int:
    """The code's version of what a kind of stage computes (in every stage's key: a raise redoes finished ones)."""
    return MEASURES[kind].results_version if kind in MEASURES else RESULTS_VERSIONS[kind]


@dataclass
class Stage:
    kind: str  # train | eval | direction | steer | compare, or a registered measure (honesty, capability, ...)
    label: str  # what the report calls it: base, refusal@insecure, refusal@insecure/step4
    inputs: dict  # what the key hashes
    cost: str  # what running it will take, in samples / steps / prompts
    model: str | None = None  # the model it loads (an experiment's model entry, a battery's subject)
    depends: list[Stage] = field(default_factory=list)
    checkpoint: int | None = None  # a saved step of the model's training run, instead of its final adapter
    steps: list[int] = field(default_factory=list)  # train stages: the steps it saves a checkpoint at
    probe: str | None = None  # direction stages: the probe spec it fits; steer stages: the direction it steers along
    config: Any = None  # eval and measure stages: the config they run with
    at: Path | None = None  # a fixed folder (the battery's OUT/<model>/<measure>) instead of one named by the key

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.label}"

    @property
    def subject(self) -> str | None:
        """The model it reads, and the saved step where it reads one (insecure, insecure/step4)."""
        return self.model if self.checkpoint is None else f"{self.model}/step{self.checkpoint}"

    @property
    def key(self) -> str:
        code = {"emlens": __version__, "results_version": results_version(self.kind)}
        return content_hash({**self.inputs, "kind": self.kind, "code": code,
                             "upstream": [s.key for s in self.depends]}, 12)

    def folder(self, root: Path) -> Path:
        if self.at is not None:
            return self.at
        return root / f"{self.kind}-{self.label.replace('@', '-').replace('/', '-')}-{self.key}"

    def done(self, root: Path) -> bool:
        folder = self.folder(root)
        if self.kind in MEASURES and self.config is not None:
            return MEASURES[self.kind].up_to_date(folder, self.config)
        if self.kind == "eval" and self.at is not None and self.config is not None:
            # a battery's fixed folder has no key to name the judge: its cfg.json does, and another judge's labels
            # are not reused (the stage re-judges the same answers)
            return finished(folder) and read_json(folder / CFG_FILE).get(JUDGE_KEY) == judged_by(self.config)
        return finished(folder)


class Models:
    """One model in memory at a time, loaded when a stage first needs it. `locate(stage)` says which: the base
    weights and the adapter (None: the base model)."""

    def __init__(self, locate: Callable[[Stage], tuple[str, str | None]], device: str):
        self.locate, self.device = locate, device
        self.loaded: tuple[str, str | None] | None = None
        self.handle: Model | None = None

    def get(self, stage: Stage) -> Model:
        wanted = self.locate(stage)
        if wanted != self.loaded:
            self.handle = None  # the old one goes before the next loads
            self.handle = load_model(wanted[0], adapter=wanted[1], device=self.device)
            self.loaded = wanted
        return self.handle


class Judges:
    """Each judge built once per plan, when a stage first needs it (the eval's by its judge settings, a measure's
    by its config)."""

    def __init__(self):
        self.built: dict[tuple, object] = {}

    def get(self, kind: str, config):
        if kind == "eval":
            key = (kind, config.judge, config.judge_model, config.judge_mode, config.judge_samples)
            build = lambda: make_judge(config.judge, config.judge_model, **config.judge_options())  # noqa: E731
        else:
            key = (kind, config.model_dump_json())
            build = lambda: MEASURES[kind].make_judge(config)  # noqa: E731
        if key not in self.built:
            self.built[key] = build()
        return self.built[key]


def run_measure(stage: Stage, folder: Path, models: Models, judges: Judges, progress: bool) -> None:
    """An eval stage (the EM eval's settings) or a registered measure, on the stage's model with its config."""
    judge = judges.get(stage.kind, stage.config)
    if stage.kind == "eval":
        run_eval(models.get(stage), stage.config, folder, judge=judge, progress=progress)
        cfg = read_json(folder / CFG_FILE)
        atomic_write_json(folder / CFG_FILE, {**cfg, JUDGE_KEY: judged_by(stage.config)})
    else:
        MEASURES[stage.kind].run(models.get(stage), stage.config, folder, judge=judge, progress=progress)


def run_stages(stages: list[Stage], root: Path, run_one: Callable[[Stage, Path], None],
               echo: Callable[[str], None], timings: Path | None = None) -> list[dict]:
    """Run every stage whose result is not there yet, in order: one record per stage (its folder, whether it was
    reused, seconds now, and the seconds it took when it ran, kept in `timings` where given)."""
    taken = read_json(timings) if timings is not None and timings.exists() else {}
    records = []
    for i, stage in enumerate(stages, 1):
        folder, reused = stage.folder(root), stage.done(root)
        echo(f"stage {i}/{len(stages)}: {stage.name} ({'done, reused' if reused else stage.cost})")
        start = time.time()
        if not reused:
            run_one(stage, folder)
            taken[stage.key] = round(time.time() - start, 1)
            if timings is not None:
                atomic_write_json(timings, taken)
        records.append({"stage": stage.name, "kind": stage.kind, "model": stage.model, "key": stage.key,
                        "folder": str(folder), "reused": reused, "seconds": round(time.time() - start, 1),
                        "stage_seconds": taken.get(stage.key)})
    return records
