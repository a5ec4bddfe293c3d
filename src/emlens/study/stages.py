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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from emlens.analysis import compare
from emlens.analysis.compare import compare_directions
from emlens.base.io import artifact_kind, atomic_write_json, content_hash, file_sha256, read_json
from emlens.base.version import __version__
from emlens.directions import probe
from emlens.directions.probe import fit_probe
from emlens.directions.specs import SpecContext, spec_input_files
from emlens.evaluation import run as eval_run
from emlens.evaluation.capability import held_out_for
from emlens.evaluation.config import EvalConfig
from emlens.evaluation.measures import MEASURES, Measure
from emlens.evaluation.run import run_eval
from emlens.evaluation.settings import sample_count
from emlens.generation.engine import planned_engine
from emlens.judges import make_judge
from emlens.judges.identity import judge_identity
from emlens.model import Model, folder_fingerprint, load_model, resolve_adapter, weights_identity
from emlens.study.experiment import LoadedExperiment, ModelEntry
from emlens.study.preflight import preflight_study
from emlens.study.steer import RESULTS_VERSION as STEER_RESULTS_VERSION
from emlens.study.steer import run_steer
from emlens.training import trainer
from emlens.training.data import build_training_data, mixture_counts
from emlens.training.runfolder import read_run
from emlens.training.trainer import train

log = logging.getLogger(__name__)
DEFAULT_STAGES = Path("artifacts") / "stages"
TIMINGS_FILE = "timings.json"
FINISHED_KINDS = ("direction", "linear_probe", "regression_probe", "comparison")  # written whole, at the end
RESULTS_VERSIONS = {"train": trainer.RESULTS_VERSION, "eval": eval_run.RESULTS_VERSION,
                    "direction": probe.RESULTS_VERSION, "steer": STEER_RESULTS_VERSION,
                    "compare": compare.RESULTS_VERSION}  # and each registered measure's own


def results_version(kind: str) -> int:
    return MEASURES[kind].results_version if kind in MEASURES else RESULTS_VERSIONS[kind]


@dataclass
class Stage:
    kind: str  # train | eval | direction | steer | compare, or a registered measure (honesty, capability, ...)
    name: str  # e.g. eval:base, direction:refusal@insecure
    inputs: dict  # what the key hashes
    cost: str  # what running it will take, in samples / steps / prompts
    model: str | None = None  # the model entry it loads
    depends: list[Stage] = field(default_factory=list)
    checkpoint: int | None = None  # a saved step of the model's training run, instead of its final adapter
    steps: list[int] = field(default_factory=list)  # train stages: the steps it saves a checkpoint at
    probe: str | None = None  # direction stages: the probe spec it fits; steer stages: the direction it steers along

    @property
    def label(self) -> str:
        """What the report calls it: its name without the kind (base, refusal@insecure, refusal@insecure/step4)."""
        return self.name.split(":", 1)[1]

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
        return root / f"{self.kind}-{self.label.replace('@', '-').replace('/', '-')}-{self.key}"

    def done(self, root: Path) -> bool:
        folder = self.folder(root)
        kind = artifact_kind(folder)
        if kind is None:
            return False
        if kind == "training_run":
            return bool((read_run(folder) or {}).get("finished"))
        return kind in FINISHED_KINDS or "finished" in read_json(folder / "cfg.json")


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
            stages.append(Stage("eval", f"eval:{entry.name}", {**reads.eval(spec.eval), "model": identity[entry.name]},
                                f"{sample_count(spec.eval)} samples", entry.name, upstream))
        for name in spec.measure_configs():
            stages.append(Stage(name, f"{name}:{entry.name}",
                                {**reads.measure(MEASURES[name], measure_config(study, name, entry.name)),
                                 "model": identity[entry.name]},
                                study.measure_costs[name], entry.name, upstream))
        if entry in spec.direction_models():
            for probe_name in study.probe_specs:
                stage = _direction_stage(study, reads, probe_name, entry.name, identity[entry.name], upstream)
                directions[(probe_name, entry.name)] = stage
                stages.append(stage)
    for _, steer in spec.steering():
        upstream = [directions[(steer.direction, steer.model)], *([trains[steer.model]] if steer.model in trains else [])]
        conditions = 1 + (len([s for s in steer.scales if s]) + (steer.operation != "add")) * (2 if steer.random_control else 1)
        stages.append(Stage("steer", f"steer:{steer.direction}@{steer.model}",
                            {**reads.eval(steer.eval), "steer": steer.model_dump(mode="json", exclude={"eval"}),
                             "model": identity[steer.model]},
                            f"{conditions} conditions x {sample_count(steer.eval)} samples", steer.model, upstream,
                            probe=steer.direction))
    if spec.compare and len(spec.direction_models()) > 1:
        for probe_name in study.probe_specs:
            series = [directions[(probe_name, m.name)] for m in spec.direction_models()]
            stages.append(Stage("compare", f"compare:{probe_name}", {"models": [m.name for m in spec.direction_models()]},
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
            stages.append(Stage("compare", f"compare:{probe_name}@{entry.name}/checkpoints",
                                {"series": [s.name for s in series]}, "no model", None, series))
    return stages


def _direction_stage(study: LoadedExperiment, reads: _Reads, probe_name: str, model: str, identity: str,
                     upstream: list[Stage], checkpoint: int | None = None) -> Stage:
    """A probe spec fitted on one model (or on one saved step of its training run)."""
    path, spec = study.probe_specs[probe_name]
    limit = study.spec.directions.limit
    at = f"{model}/step{checkpoint}" if checkpoint is not None else model
    return Stage("direction", f"direction:{probe_name}@{at}",
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
    return Stage("train", f"train:{entry.name}", {"config": config.run_config(), "data": data.sha256,
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


class _Models:
    """One model in memory at a time, loaded when a stage needs it."""

    def __init__(self, study: LoadedExperiment, root: Path, stages: list[Stage], device: str):
        self.study, self.root, self.device = study, root, device
        self.trained = {s.model: s.folder(root) for s in stages if s.kind == "train"}
        self.name: tuple[str, int | None] | None = None
        self.handle: Model | None = None

    def get(self, name: str, checkpoint: int | None = None) -> Model:
        if (name, checkpoint) != self.name:
            entry = self.study.spec.entry(name)
            adapter = str(self.trained[name]) if name in self.trained else entry.adapter
            if checkpoint is not None:
                adapter = f"{adapter}@{checkpoint}"
            self.handle = load_model(entry.model, adapter=adapter, device=self.device)
            self.name = (name, checkpoint)
        return self.handle


def run_study(study: LoadedExperiment, root: Path = DEFAULT_STAGES, device: str = "auto", progress: bool = True,
              echo: Callable[[str], None] = log.info) -> tuple[list[Stage], list[dict]]:
    """Run every stage not already done: the stages, and one record per stage (folder, reused, seconds)."""
    stages = plan(study, device)
    preflight_study(study, stages, root)  # every judge it will build, before any work
    models = _Models(study, root, stages, device)
    judges: dict[tuple, object] = {}
    timings = _recorded_times(root)
    records = []
    for i, stage in enumerate(stages, 1):
        folder, reused = stage.folder(root), stage.done(root)
        echo(f"stage {i}/{len(stages)}: {stage.name} ({'done, reused' if reused else stage.cost})")
        start = time.time()
        if not reused:
            _run_stage(study, stage, folder, models, judges, progress)
            timings[stage.key] = round(time.time() - start, 1)
            atomic_write_json(root / TIMINGS_FILE, timings)
        records.append({"stage": stage.name, "kind": stage.kind, "model": stage.model, "key": stage.key,
                        "folder": str(folder), "reused": reused, "seconds": round(time.time() - start, 1),
                        "stage_seconds": timings.get(stage.key)})
    return stages, records


def _recorded_times(root: Path) -> dict[str, float]:
    """Wall seconds each stage took when it ran (a reused stage keeps its own figure)."""
    path = root / TIMINGS_FILE
    return read_json(path) if path.exists() else {}


def _judge(judges: dict, config: EvalConfig):
    key = (config.judge, config.judge_model, config.judge_mode, config.judge_samples)
    if key not in judges:
        judges[key] = make_judge(config.judge, config.judge_model, **config.judge_options())
    return judges[key]


def _measure_judge(judges: dict, name: str, config):
    """Each measure's judge, built once per study (for the same config)."""
    key = (name, config.model_dump_json())
    if key not in judges:
        judges[key] = MEASURES[name].make_judge(config)
    return judges[key]


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


def _run_stage(study: LoadedExperiment, stage: Stage, folder: Path, models: _Models, judges: dict,
               progress: bool) -> None:
    spec = study.spec
    if stage.kind == "train":
        train(study.train_configs[stage.model], folder, device=models.device, progress=progress)
    elif stage.kind == "eval":
        run_eval(models.get(stage.model), spec.eval, folder, judge=_judge(judges, spec.eval), progress=progress)
    elif stage.kind in MEASURES:
        config = measure_config(study, stage.kind, stage.model)
        MEASURES[stage.kind].run(models.get(stage.model), config, folder,
                                 judge=_measure_judge(judges, stage.kind, config), progress=progress)
    elif stage.kind == "direction":
        fit_probe(study.probe_specs[stage.probe][0], models.get(stage.model, stage.checkpoint), out=folder,
                  limit=spec.directions.limit, progress=progress)
    elif stage.kind == "steer":
        steer = spec.steer_section(stage.probe, stage.model)
        entry = spec.entry(steer.model)
        direction = stage.depends[0].folder(models.root)
        steer_spec = steer.spec(spec.name, entry, direction)
        run_steer(steer_spec, folder.parent, folder, handle=models.get(steer.model), judge=_judge(judges, steer.eval),
                  progress=progress, echo=log.info)
    else:  # compare
        compare_directions([s.folder(models.root) for s in stage.depends], folder)


