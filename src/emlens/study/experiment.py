"""The experiment file of `emlens run`: which models, and one config section per stage.

    name: quickstart
    models:
      - {name: base}                                   # the embedded model
      - name: insecure                                 # trained for the run, then studied
        train: {config: ../configs/insecure_smollm2.yaml, dataset: {limit: 64}, training: {max_steps: 16}}
    eval: {settings: [free_form, refusal], nudges: [none, evil, hhh]}      # EvalConfig
    directions: {specs: [../probes/refusal.yaml], limit: 24}              # probe specs, fitted on every model
    steer: {model: base, direction: refusal, layer: 15, scales: [0, 2.0]} # a dose-response with its control
                                                                           # (or a list of them, one per direction)
    compare: true                                                          # each direction across the models
    contrasts: [[insecure, base]]                                          # the report's first table: a - b
    honesty: {nudges: [none, evil], limit: 30}                            # HonestyConfig, on every model
    capability: {mc_limit: 100, gsm8k_limit: 20}                          # CapabilityConfig, on every model

Paths are relative to the experiment file. The whole file is validated (unknown fields, bad values, missing
files, a steer section naming an unknown model or direction) before any stage runs; each problem is one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from emlens.base.config import Config
from emlens.base.errors import EmlensInputError
from emlens.base.io import deep_merge, fail, read_yaml_mapping, validate
from emlens.directions.specs import ProbeSpec, load_spec
from emlens.evaluation.capability import CapabilityConfig
from emlens.evaluation.config import EvalConfig
from emlens.evaluation.honesty import HonestyConfig
from emlens.evaluation.measures import MEASURES
from emlens.model import DEFAULT_MODEL
from emlens.study.steer import SteerSpec
from emlens.study.sweep import sweep_configs
from emlens.training.config import TrainConfig, parse_config

NAME = r"^[A-Za-z0-9_.-]+$"


class TrainSection(BaseModel):
    """A training config YAML, with fields laid over it (e.g. a smaller `dataset.limit` or `training.max_steps`)."""

    model_config = ConfigDict(extra="allow")
    config: str

    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ModelEntry(BaseModel):
    """One model of the study: a base model, optionally with an adapter, or trained for the run."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME)
    model: str = DEFAULT_MODEL
    adapter: str | None = None
    train: TrainSection | None = None

    @model_validator(mode="after")
    def _one_adapter_source(self):
        if self.adapter is not None and self.train is not None:
            raise ValueError("give adapter or train, not both")
        return self


class DirectionsSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    specs: list[str] = Field(min_length=1)  # probe spec YAMLs (see probes/)
    limit: int | None = Field(None, ge=2)  # rows per side of each contrast (small runs)
    models: list[str] | None = None  # default: every model
    checkpoints: bool = False  # also at every saved step of the models trained for the run, compared along each series


class SteerSection(SteerSpec):
    """A steering experiment (`emlens steer`'s spec) on one of the study's models, along one of its fitted
    directions, beside its random control: `model` names a model entry and `direction` a probe spec."""

    name: str = ""  # default: EXPERIMENT-DIRECTION
    model: str
    adapter: None = None  # the model entry's
    latent: None = None  # a fitted direction, not an SAE latent
    scales: list[float] = Field(default_factory=lambda: [0.0, 1.0, 2.0])
    eval: EvalConfig = EvalConfig(settings=["refusal"], nudges=["none"])

    def spec(self, experiment: str, entry: ModelEntry, direction: Path) -> SteerSpec:
        """The steering spec this section runs, with the entry's model and adapter and the fitted direction."""
        fields = self.model_dump(exclude={"name", "model", "adapter", "direction", "eval"})
        return SteerSpec(**fields, name=self.name or f"{experiment}-{self.direction}", model=entry.model,
                         adapter=entry.adapter, direction=str(direction.resolve()), eval=self.eval)


class Experiment(Config):
    name: str = Field(pattern=NAME)
    description: str = ""
    models: list[ModelEntry] = Field(min_length=1)
    eval: EvalConfig | None = None
    directions: DirectionsSection | None = None
    steer: SteerSection | list[SteerSection] | None = None  # one dose-response, or several (one per direction)
    compare: bool = True
    # pairs of models (a, b) whose rates the report's first table subtracts, a minus b; default: each other model
    # minus the first
    contrasts: list[tuple[str, str]] | None = None
    honesty: HonestyConfig | None = None  # honesty under pressure on every model
    capability: CapabilityConfig | None = None  # capability on every model (GSM8K held out of a mixture's order)
    # and a section for every other registered measure: see `experiment_model`

    @model_validator(mode="after")
    def _names_refer(self):
        names = [m.name for m in self.models]
        if len(set(names)) < len(names):
            raise ValueError(f"models: duplicate name in {names}")
        for name in (self.directions.models or []) if self.directions else []:
            if name not in names:
                raise ValueError(f"directions.models: unknown model '{name}' (models: {', '.join(names)})")
        for pair in self.contrasts or []:
            for name in pair:
                if name not in names:
                    raise ValueError(f"contrasts: unknown model '{name}' (models: {', '.join(names)})")
        for field, steer in self.steering():
            if steer.model not in names:
                raise ValueError(f"{field}.model: unknown model '{steer.model}' (models: {', '.join(names)})")
            if self.directions is None:
                raise ValueError("steer needs a directions section (it steers along a fitted direction)")
        targets = [(steer.direction, steer.model) for _, steer in self.steering()]
        if len(set(targets)) < len(targets):
            raise ValueError("steer: two sections steer the same direction on the same model")
        return self

    def steering(self) -> list[tuple[str, SteerSection]]:
        """(field name, section) of every steering section: `steer` itself, or `steer.0`, `steer.1`, ..."""
        if self.steer is None:
            return []
        if isinstance(self.steer, SteerSection):
            return [("steer", self.steer)]
        return [(f"steer.{i}", steer) for i, steer in enumerate(self.steer)]

    def steer_section(self, direction: str, model: str) -> SteerSection:
        return next(s for _, s in self.steering() if s.direction == direction and s.model == model)

    def measure_configs(self) -> dict[str, BaseModel]:
        """Every measure this experiment takes of each model, in the registry's order: name -> config."""
        return {name: getattr(self, name) for name in MEASURES if getattr(self, name, None) is not None}


    def model_contrasts(self) -> list[tuple[str, str]]:
        first = self.models[0].name
        return self.contrasts if self.contrasts is not None else [(m.name, first) for m in self.models[1:]]

    def entry(self, name: str) -> ModelEntry:
        return next(m for m in self.models if m.name == name)

    def direction_models(self) -> list[ModelEntry]:
        chosen = self.directions.models if self.directions and self.directions.models else None
        return [m for m in self.models if chosen is None or m.name in chosen]


def experiment_model() -> type[Experiment]:
    """The experiment schema with one optional section per registered measure (`emlens measures`), each that
    measure's config: so a measure registered anywhere is a section, validated field by field."""
    extra = {name: (measure.config | None, None) for name, measure in MEASURES.items()
             if name not in Experiment.model_fields}
    return create_model("Experiment", __base__=Experiment, **extra) if extra else Experiment


class LoadedExperiment:
    """An experiment with every file it names read and checked: training configs and probe specs."""

    def __init__(self, path: str | Path, engine: str | None = None):
        self.path = Path(path)
        self.spec: Experiment = experiment_model().from_yaml(self.path)  # section files read beside it
        if engine is not None:
            self.spec = _with_engine(self.spec, engine, self.path)
        self.base = self.path.resolve().parent
        self.train_configs: dict[str, TrainConfig] = {}
        points = {m.name: self._sweep_points(m) for m in self.spec.models}
        self.spec = self.spec.model_copy(update={"models": [p for group in points.values() for p in group]})
        if self.spec.directions is not None and self.spec.directions.models:  # a sweep's name means all its runs
            chosen = [p.name for name in self.spec.directions.models for p in points[name]]
            self.spec.directions = self.spec.directions.model_copy(update={"models": chosen})
        self.probe_specs: dict[str, tuple[Path, ProbeSpec]] = {}
        for i, relative in enumerate(self.spec.directions.specs if self.spec.directions else []):
            spec_path = self.resolve(relative, f"directions.specs.{i}")
            probe = load_spec(spec_path)
            self.probe_specs[probe.name] = (spec_path, probe)
        # every measure reads and checks its files here (a bad MC or GSM8K file fails before any stage)
        self.measure_costs = {name: MEASURES[name].prepare(config)
                              for name, config in self.spec.measure_configs().items()}
        for field, steer in self.spec.steering():
            if steer.direction not in self.probe_specs:
                raise fail(self.path, f"field '{field}.direction': no probe spec named '{steer.direction}' "
                                      f"(directions: {', '.join(self.probe_specs)})")

    def resolve(self, relative: str, field: str) -> Path:
        path = Path(relative).expanduser()
        path = path if path.is_absolute() else self.base / path
        if not path.exists():
            raise fail(self.path, f"field '{field}': no such file {path}")
        return path

    def _sweep_points(self, entry: ModelEntry) -> list[ModelEntry]:
        """The entry itself, or one entry per run of its training config's sweep (named ENTRY-RUN)."""
        if entry.train is None:
            return [entry]
        config = self._train_config(entry)
        if config.sweep is None:
            self.train_configs[entry.name] = config
            return [entry]
        try:
            runs = sweep_configs(config)
        except EmlensInputError as error:
            raise fail(self.path, f"model '{entry.name}': {error}") from None
        for field, steer in self.spec.steering():
            if steer.model == entry.name:
                raise fail(self.path, f"field '{field}.model': '{entry.name}' is a sweep of {len(runs)} runs; name "
                                      f"one of them ({', '.join(f'{entry.name}-{n}' for n, _ in runs)})")
        points = []
        for run_name, run_config in runs:
            point = entry.model_copy(update={"name": f"{entry.name}-{run_name}"})
            self.train_configs[point.name] = run_config
            points.append(point)
        return points

    def _train_config(self, entry: ModelEntry) -> TrainConfig:
        where = f"models.{self.spec.models.index(entry)}.train"
        config_path = self.resolve(entry.train.config, f"{where}.config")
        data = deep_merge(read_yaml_mapping(config_path, "TrainConfig"), entry.train.overrides())
        return parse_config(data, where=f"{self.path} field '{where}'", base_dir=config_path.resolve().parent)


def _with_engine(spec: Experiment, engine: str, path: Path) -> Experiment:
    """The experiment with every eval section sampled by `engine` (a command-line override)."""
    update = {}
    if spec.eval is not None:
        update["eval"] = spec.eval.with_flags(engine=engine, where=f"{path} (--engine)")
    if spec.steer is not None:
        sections = [steer.model_copy(update={"eval": steer.eval.with_flags(engine=engine, where=f"{path} (--engine)")})
                    for _, steer in spec.steering()]
        update["steer"] = sections if isinstance(spec.steer, list) else sections[0]
    for name, config in spec.measure_configs().items():
        if "engine" in type(config).model_fields:
            update[name] = validate(type(config), {**config.model_dump(), "engine": engine}, f"{path} (--engine)")
    return spec.model_copy(update=update)

