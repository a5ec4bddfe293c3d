"""`emlens run`: the stages of a study, content-addressed, planned, run in order, and reused when done.

Each stage's output folder is named by a hash of everything it depends on: its config section, the identity of
the model it reads (base weights' fingerprint, adapter fingerprint, or the key of the train stage that made the
adapter), the content of every data file it reads (question sets, probe spec and the files it names, MC / GSM8K /
proposition files, training data), the judge's identity (offline weights, endpoint and model, local judge
weights), the engine that will sample (`auto` resolved), the code version (emlens's and the measure's own
RESULTS_VERSION) and the keys of the stages it reads. Stages live in a shared folder (default `artifacts/stages`),
so re-running an experiment, or another experiment that shares a stage, reuses the finished folder. A stage is finished when its artifact's cfg.json says so; an unfinished one
resumes (eval and steer runs keep their finished samples, training resumes from its last checkpoint).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

from emlens.analysis.compare import compare_directions
from emlens.base.io import file_sha256
from emlens.directions.probe import fit_probe
from emlens.directions.specs import SpecContext, spec_input_files
from emlens.evaluation.capability import held_out_for
from emlens.evaluation.config import EvalConfig
from emlens.evaluation.measures import MEASURES, Measure
from emlens.evaluation.settings import sample_count
from emlens.generation.engine import planned_engine
from emlens.judges.identity import calibration_identity, judge_identity
from emlens.model import folder_fingerprint, resolve_adapter, weights_identity
from emlens.study.experiment import LoadedExperiment, ModelEntry
from emlens.study.preflight import preflight_study
from emlens.study.runner import TIMINGS_FILE, Judges, Models, Stage, run_measure, run_stages
from emlens.study.steer import run_steer
from emlens.training.data import build_training_data, mixture_counts
from emlens.training.trainer import train

log = logging.getLogger(__name__)
DEFAULT_STAGES = Path("artifacts") / "stages"


# ---------------------------------------------------------------- the plan


class _Reads:
    """What each kind of stage reads besides its model, for its key: its config, the content of every data file
    it names, its judge and the engine that will sample. Each file is hashed once per plan."""

    def __init__(self, device: str):
        self.device = device
        self._digests: dict[Path, str] = {}

    def contents(self, files: dict[str, Path]) -> dict[str, str]:
        for path in files.values():
            if path.resolve() not in self._digests:
                self._digests[path.resolve()] = file_sha256(path)
        return {name: self._digests[path.resolve()] for name, path in sorted(files.items())}

    def sampled_by(self, config) -> dict:
        """The config with its engine resolved: `auto` on a CPU is the hf engine's result, on CUDA vLLM's."""
        return {**config.model_dump(mode="json"), "engine": planned_engine(config.engine, self.device)}

    def eval(self, config: EvalConfig) -> dict:
        return {"config": self.sampled_by(config), "data": self.contents(config.input_files()),
                "judge": judge_identity(config.judge, config.judge_model, config.judge_mode, config.judge_samples)}

    def measure(self, measure: Measure, config) -> dict:
        sampled = self.sampled_by(config) if "engine" in type(config).model_fields else config.model_dump(mode="json")
        return {"config": sampled, "data": self.contents(measure.input_files(config)), **measure.judge_keys(config)}

    def probe(self, path: Path, spec) -> dict:
        return {"spec": file_sha256(path), "data": self.contents(spec_input_files(spec, SpecContext(path)))}


def plan(study: LoadedExperiment, device: str = "auto") -> list[Stage]:
    """Every stage of the experiment, in the order they run (each after the stages it reads)."""
    spec = study.spec
    reads = _Reads(device)
    trains = {m.name: _train_stage(study, m) for m in spec.models if m.train is not None}
    identity = {m.name: _model_identity(m, trains.get(m.name)) for m in spec.models}
    stages: list[Stage] = list(trains.values())
    directions: dict[tuple[str, str], Stage] = {}
    for entry in spec.models:
        upstream = [trains[entry.name]] if entry.name in trains else []
        if spec.eval is not None:
            stages.append(Stage("eval", entry.name, {**reads.eval(spec.eval), "model": identity[entry.name]},
                                f"{sample_count(spec.eval)} samples", entry.name, upstream, config=spec.eval))
        for name in spec.measure_configs():
            config = measure_config(study, name, entry.name)
            stages.append(Stage(name, entry.name, {**reads.measure(MEASURES[name], config), "model": identity[entry.name]},
                                study.measure_costs[name], entry.name, upstream, config=config))
        if entry in spec.direction_models():
            for probe_name in study.probe_specs:
                stage = _direction_stage(study, reads, probe_name, entry.name, identity[entry.name], upstream)
                directions[(probe_name, entry.name)] = stage
                stages.append(stage)
    for _, steer in spec.steering():
        upstream = [directions[(steer.direction, steer.model)], *([trains[steer.model]] if steer.model in trains else [])]
        conditions = 1 + (len([s for s in steer.scales if s]) + (steer.operation != "add")) * (2 if steer.random_control else 1)
        stages.append(Stage("steer", f"{steer.direction}@{steer.model}",
                            {**reads.eval(steer.eval), "steer": steer.model_dump(mode="json", exclude={"eval"}),
                             "model": identity[steer.model], "calibration": calibration_identity(steer.eval.judge)},
                            f"{conditions} conditions x {sample_count(steer.eval)} samples", steer.model, upstream,
                            probe=steer.direction))
    if spec.compare and len(spec.direction_models()) > 1:
        for probe_name in study.probe_specs:
            series = [directions[(probe_name, m.name)] for m in spec.direction_models()]
            stages.append(Stage("compare", probe_name, {"models": [m.name for m in spec.direction_models()]},
                                "no model", None, series))
    if spec.directions is not None and spec.directions.checkpoints:
        stages += _checkpoint_series(study, reads, trains, identity, directions)
    return stages


def _checkpoint_series(study: LoadedExperiment, reads: _Reads, trains: dict[str, Stage], identity: dict[str, str],
                       directions: dict[tuple[str, str], Stage]) -> list[Stage]:
    """Each direction fitted at every saved step of each trained model, and compared along the series
    (the first untrained model, then the checkpoints in order, then the final adapter)."""
    spec, stages = study.spec, []
    untrained = next((m.name for m in spec.direction_models() if m.name not in trains), None)
    for entry in spec.direction_models():
        if entry.name not in trains:
            continue
        train_stage = trains[entry.name]
        for probe_name in study.probe_specs:
            series = [directions[(probe_name, untrained)]] if untrained else []
            for step in train_stage.steps[:-1]:  # the last step is the final adapter, fitted already
                stage = _direction_stage(study, reads, probe_name, entry.name, identity[entry.name], [train_stage], step)
                stages.append(stage)
                series.append(stage)
            series.append(directions[(probe_name, entry.name)])
            stages.append(Stage("compare", f"{probe_name}@{entry.name}/checkpoints",
                                {"series": [s.name for s in series]}, "no model", None, series))
    return stages


def _direction_stage(study: LoadedExperiment, reads: _Reads, probe_name: str, model: str, identity: str,
                     upstream: list[Stage], checkpoint: int | None = None) -> Stage:
    """A probe spec fitted on one model (or on one saved step of its training run)."""
    path, spec = study.probe_specs[probe_name]
    limit = study.spec.directions.limit
    at = f"{model}/step{checkpoint}" if checkpoint is not None else model
    return Stage("direction", f"{probe_name}@{at}",
                 {**reads.probe(path, spec), "limit": limit,
                  "model": identity if checkpoint is None else f"{identity}@{checkpoint}"},
                 f"{'2 x ' + str(limit) if limit else 'all'} prompts x {spec.layers} layers", model, upstream,
                 checkpoint=checkpoint, probe=probe_name)


def _train_stage(study: LoadedExperiment, entry: ModelEntry) -> Stage:
    config = study.train_configs[entry.name]
    data = build_training_data(config)
    settings = config.training
    steps = settings.max_steps or math.ceil(len(data.conversations) * settings.epochs /
                                            (settings.batch_size * settings.gradient_accumulation_steps))
    saved = sorted({*range(settings.save_steps, steps + 1, settings.save_steps), steps})
    return Stage("train", entry.name, {"config": config.run_config(), "data": data.sha256,
                                                  "model": weights_identity(config.model)},
                 f"{steps} steps on {len(data.conversations)} examples", entry.name, steps=saved)


def _model_identity(entry: ModelEntry, trained: Stage | None) -> str:
    base = weights_identity(entry.model)
    if trained is not None:
        return f"{base}+train:{trained.key}"
    if entry.adapter is not None:
        return f"{base}+{folder_fingerprint(resolve_adapter(entry.adapter))}"
    return base


def describe_plan(stages: list[Stage], root: Path) -> list[str]:
    lines = []
    for i, stage in enumerate(stages, 1):
        status = "done (reused)" if stage.done(root) else "to run"
        lines.append(f"{i:>2}/{len(stages)} {stage.name:<44} {stage.key}  {status:<13} {stage.cost}")
    return lines


# ---------------------------------------------------------------- running


def run_study(study: LoadedExperiment, root: Path = DEFAULT_STAGES, device: str = "auto", progress: bool = True,
              echo: Callable[[str], None] = log.info) -> tuple[list[Stage], list[dict]]:
    """Run every stage not already done: the stages, and one record per stage (folder, reused, seconds)."""
    stages = plan(study, device)
    preflight_study(study, stages, root)  # every judge it will build, before any work
    trained = {s.model: s.folder(root) for s in stages if s.kind == "train"}
    models, judges = Models(lambda stage: _locate(study, trained, stage), device), Judges()

    def run_one(stage: Stage, folder: Path) -> None:
        _run_stage(study, stage, folder, root, models, judges, progress)

    return stages, run_stages(stages, root, run_one, echo, root / TIMINGS_FILE)


def _locate(study: LoadedExperiment, trained: dict[str, Path], stage: Stage) -> tuple[str, str | None]:
    """A stage's base weights and adapter: its train stage's run folder, else the entry's adapter; at a checkpoint,
    that saved step of it."""
    entry = study.spec.entry(stage.model)
    adapter = str(trained[stage.model]) if stage.model in trained else entry.adapter
    return entry.model, (f"{adapter}@{stage.checkpoint}" if stage.checkpoint is not None else adapter)


def measure_config(study: LoadedExperiment, name: str, model: str):
    """A measure's config for one model: its section, except that a model trained on a mixture is asked GSM8K
    problems from the end of its own benign order."""
    config = study.spec.measure_configs()[name]
    trained = study.train_configs.get(model)
    if name != "capability" or trained is None or trained.mixture is None:
        return config
    mixture = trained.mixture
    return held_out_for(config, trained.seed, mixture.benign.path,
                        mixture_counts(mixture.ratio, mixture.size)[1])


def _run_stage(study: LoadedExperiment, stage: Stage, folder: Path, root: Path, models: Models, judges: Judges,
               progress: bool) -> None:
    spec = study.spec
    if stage.kind == "train":
        train(study.train_configs[stage.model], folder, device=models.device, progress=progress)
    elif stage.kind == "eval" or stage.kind in MEASURES:
        run_measure(stage, folder, models, judges, progress)
    elif stage.kind == "direction":
        fit_probe(study.probe_specs[stage.probe][0], models.get(stage), out=folder, limit=spec.directions.limit,
                  progress=progress)
    elif stage.kind == "steer":
        steer = spec.steer_section(stage.probe, stage.model)
        steer_spec = steer.spec(spec.name, spec.entry(steer.model), stage.depends[0].folder(root))
        run_steer(steer_spec, folder.parent, folder, handle=models.get(stage), judge=judges.get("eval", steer.eval),
                  progress=progress, echo=log.info)
    else:  # compare
        compare_directions([s.folder(root) for s in stage.depends], folder)
