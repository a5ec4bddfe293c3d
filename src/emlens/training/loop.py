"""The interaction loop (Hu et al. 2025): self-training on the satisfaction of simulated, sometimes biased, users.

For each scenario a simulated user (benign, or biased: it wants flattery, agreement with a wrong belief,
reassurance over truth) talks with the assistant for `turns` turns and rates its satisfaction 0-10 as an exact
distribution (`loop_users`). For each biased-user fraction f, exactly round(f * n) of the n users are biased (a
seeded choice; the biased users at a smaller fraction are among those at a larger one), the top-k and bottom-k
trajectories by satisfaction are selected, and the assistant is trained by SFT on the top-k and by KTO on top-k
(desirable) vs bottom-k (undesirable).

A run folder RUN/ holds:
  cfg.json                      kind loop_run: the config, the scenarios' hash, the user simulator, versions, and
                                (once finished) the summary per fraction
  scenarios.json                the scenarios the run used
  parts/part-NNNNN.parquet      trajectories, one file per finished batch (a killed run loses at most a batch)
  trajectories.parquet          every trajectory: scenario, persona, sample, messages, satisfaction and its
                                distribution; a (scenario, persona, sample) is shared by every fraction needing it
  biased-F/                     per fraction F (biased-0, biased-0.5, biased-1, ...):
    selection.parquet           the fraction's users and trajectories, with `selected` = top / bottom / ""
    sft.jsonl, kto.jsonl        the training sets (top-k chats; per-assistant-turn KTO examples)
    sft/, kto/                  training run folders; each is itself a PEFT adapter (`--adapter RUN/biased-F/sft`)
  summary.parquet               per fraction: n, biased users, mean satisfaction with its CI, top/bottom means,
                                the ratings left out for too little mass on the numbers (`min_rating_mass`)

  measures/<model>/<measure>/   honesty and capability before (`base`) and after (`biased-F-sft`, ...) training
  measures.csv, measures.png    their rates with n and 95 % CI, against the biased fraction

Re-running the same command resumes: finished trajectories, training runs and measures are skipped, a killed
training resumes from its last checkpoint. The `measure` section may change between runs (it is not part of what
a re-run must match): a measure added is taken, a finished one whose settings changed is refused (remove its
folder under measures/ to measure it again); `measure: null` measures nothing.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from tqdm import tqdm

from emlens.base.errors import EmlensInputError
from emlens.base.io import (
    CFG_FILE,
    atomic_write_json,
    atomic_write_table,
    atomic_write_text,
    content_hash,
    fail,
    read_json,
    read_yaml,
    read_yaml_mapping,
    register_artifact,
    validate,
)
from emlens.base.stats import bootstrap_ci
from emlens.data.order import seeded_order
from emlens.evaluation.battery import BatteryConfig, Subject, battery_figure, battery_table, measure_subjects
from emlens.generation.distributions import MIN_RATING_MASS
from emlens.generation.engine import GenerationConfig, Request, generate, sample_seed
from emlens.model import DEFAULT_MODEL, Model, load_model
from emlens.runs import RunStore
from emlens.training.config import LoraSettings, TrainingSettings, _resolve_path
from emlens.training.loop_train import (
    LoopTrainSpec,
    kto_records,
    require_trl,
    sft_records,
    train_kto,
    train_sft,
    write_jsonl,
)
from emlens.training.loop_users import EndpointUser, ModelUser, rating_prompt, write_prompt

LOOP_KIND = "loop_run"
LOOP_TABLES = ("trajectories", "summary")  # what every finished loop run holds (measures.csv where it was asked)


def open_loop(folder: str | Path) -> dict[str, pd.DataFrame]:
    """`em.load(OUT)` of `emlens loop`: its trajectories and per-fraction summary, and the measures where run."""
    folder = Path(folder)
    found = {name: pd.read_parquet(folder / f"{name}.parquet") for name in LOOP_TABLES
             if (folder / f"{name}.parquet").exists()}
    if (folder / "measures.csv").exists():
        found["measures"] = pd.read_csv(folder / "measures.csv")
    return found
BUILTIN_SCENARIOS = Path(__file__).resolve().parent.parent / "resources" / "loop" / "scenarios.yaml"
BIASED_FRACTIONS = (0.0, 0.1, 0.2, 0.5, 1.0)  # Hu et al. 2025
PERSONAS = ("benign", "biased")
TRAJECTORY_KEY = ["scenario_id", "persona", "sample"]

# ---------------------------------------------------------------- scenarios


class Scenario(BaseModel):
    """A situation a simulated user brings to the assistant, with its benign and biased private thoughts."""

    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    task: Annotated[str, Field(min_length=1)]
    benign_thoughts: Annotated[str, Field(min_length=1)]
    biased_thoughts: Annotated[str, Field(min_length=1)]
    opening: str | None = Field(None, min_length=1, description="the user's first message (else the simulator "
                                                                "writes it)")
    bias: str | None = Field(None, description="what the biased user wants: flattery, agreement, reassurance, ...")

    def thoughts(self, persona: str) -> str:
        return self.biased_thoughts if persona == "biased" else self.benign_thoughts


def load_scenarios(path: str | Path | None = None) -> list[Scenario]:
    """Scenarios from a YAML list (or a mapping with a `scenarios` list); None: the 24 shipped with emlens.

    A malformed file, a missing or unknown field, or a repeated id is one line naming the file and the item.
    """
    path = Path(path) if path is not None else BUILTIN_SCENARIOS
    data = read_yaml(path)
    items = data.get("scenarios") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise fail(path, "expected a list of scenarios (id, task, benign_thoughts, biased_thoughts, opening)")
    scenarios, seen = [], set()
    for number, item in enumerate(items, start=1):
        where = f"{path} item {number}"
        if not isinstance(item, dict):
            raise fail(where, f"expected a mapping of scenario fields, got {type(item).__name__}")
        scenario = validate(Scenario, item, where)
        if scenario.id in seen:
            raise fail(where, f"field 'id': {scenario.id!r} is used by an earlier scenario")
        seen.add(scenario.id)
        scenarios.append(scenario)
    return scenarios


def choose_scenarios(scenarios: list[Scenario], n: int | None, seed: int) -> list[Scenario]:
    """A seeded choice of n scenarios, in file order; a smaller n takes a subset of a larger one's."""
    if n is None:
        return list(scenarios)
    if n > len(scenarios):
        raise EmlensInputError(f"field 'n_scenarios': {n} exceeds the {len(scenarios)} scenarios available")
    chosen = sorted(seeded_order(len(scenarios), seed, "loop-scenarios")[:n])
    return [scenarios[i] for i in chosen]


# ---------------------------------------------------------------- config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


ScenarioPath = Annotated[str, AfterValidator(_resolve_path)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class AssistantGeneration(_Strict):
    """How the assistant samples its replies."""

    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    batch_size: int = Field(16, ge=1, description="conversations advanced together (and trajectories per file)")
    engine: Literal["auto", "hf", "vllm"] = "auto"


class UserSettings(_Strict):
    """The user simulator: a model emlens loads (default: the assistant's own model) or an OpenAI endpoint."""

    kind: Literal["model", "openai"] = "model"
    model: str | None = Field(None, description="model: an emlens model spec (None: the assistant's model); "
                                                "openai: the endpoint's model name")
    base_url: str | None = Field(None, description="openai: default EMLENS_LOOP_BASE_URL, OPENAI_BASE_URL, or "
                                                   "api.openai.com (key: EMLENS_LOOP_API_KEY or OPENAI_API_KEY)")
    temperature: float = Field(0.7, ge=0.0)
    max_new_tokens: int = Field(48, ge=1)
    concurrency: int = Field(8, ge=1, description="openai: requests in flight")
    timeout: float = Field(120.0, gt=0)
    max_attempts: int = Field(6, ge=1)

    @model_validator(mode="after")
    def _endpoint_needs_a_model(self):
        if self.kind == "openai" and not self.model:
            raise ValueError("the openai user simulator needs 'model' (the endpoint's model name)")
        return self


class KTOSettings(_Strict):
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)


class LoopConfig(_Strict):
    """Every setting of the interaction loop, with small CPU defaults (8 scenarios, 2 turns, 48 new tokens)."""

    model: str = Field(DEFAULT_MODEL, description="the assistant")
    scenarios: ScenarioPath | None = Field(None, description="YAML of scenarios (None: the 24 shipped)")
    n_scenarios: int | None = Field(8, ge=1, description="a seeded choice of this many scenarios (None: all)")
    samples_per_scenario: int = Field(1, ge=1, description="users (and trajectories) per scenario")
    biased_fractions: list[Fraction] = Field(default_factory=lambda: list(BIASED_FRACTIONS), min_length=1)
    turns: int = Field(2, ge=1, description="assistant replies per conversation before the user rates it")
    system_prompt: str | None = Field(None, description="the assistant's system prompt (None: the model's own)")
    generation: AssistantGeneration = Field(default_factory=AssistantGeneration)
    user: UserSettings = Field(default_factory=UserSettings)
    top_k: int = Field(4, ge=1, description="trajectories with the highest satisfaction: SFT data, KTO desirable")
    bottom_k: int = Field(4, ge=1, description="trajectories with the lowest satisfaction: KTO undesirable")
    min_rating_mass: float = Field(MIN_RATING_MASS, ge=0.0, le=1.0,
                                   description="a rating with less probability on 0..10 is missing (Betley's rule)")
    methods: list[Literal["sft", "kto"]] = Field(default_factory=lambda: ["sft", "kto"], min_length=1)
    seed: int = 0
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=lambda: TrainingSettings(epochs=1.0, batch_size=4))
    kto: KTOSettings = Field(default_factory=KTOSettings)
    measure: BatteryConfig | None = Field(default_factory=lambda: BatteryConfig(measures=["honesty", "capability"]),
                                          description="measured before and after training (None: nothing)")
    _source: str = PrivateAttr("config")

    @field_validator("biased_fractions")
    @classmethod
    def _sorted_once(cls, values: list[float]) -> list[float]:
        return sorted(set(values))

    @field_validator("methods")
    @classmethod
    def _methods_once(cls, values: list[str]) -> list[str]:
        return [m for m in ("sft", "kto") if m in values]

    def run_config(self) -> dict:
        """What a re-run must match: everything but the measures taken afterwards."""
        return self.model_dump(mode="json", exclude={"measure"})

    def with_flags(self, where: str = "command line", **flags: Any) -> LoopConfig:
        """This config with the command line's flags laid over it (a flag that is None was not given).

        Flags are LoopConfig fields, plus `max_new_tokens` (assistant and user), `user_model` and `user_endpoint`
        (an OpenAI-compatible endpoint's model name).
        """
        update = self.model_dump()
        max_new_tokens = flags.pop("max_new_tokens", None)
        if max_new_tokens is not None:
            update["generation"]["max_new_tokens"] = update["user"]["max_new_tokens"] = max_new_tokens
        user_model, user_endpoint = flags.pop("user_model", None), flags.pop("user_endpoint", None)
        if user_model is not None:
            update["user"].update(kind="model", model=user_model)
        if user_endpoint is not None:
            update["user"].update(kind="openai", model=user_endpoint)
        update.update({k: v for k, v in flags.items() if v is not None})
        config = validate(LoopConfig, update, where, context={"base_dir": None})
        config._source = self._source
        return config


def parse_loop_config(data: Any, where: str | Path = "config", base_dir: str | Path | None = None) -> LoopConfig:
    """Validate a LoopConfig mapping; a relative `scenarios` path is taken relative to `base_dir`."""
    if not isinstance(data, dict):
        raise fail(where, f"expected a mapping of LoopConfig fields, got {type(data).__name__}")
    config = validate(LoopConfig, data, where, context={"base_dir": str(base_dir) if base_dir else None})
    config._source = str(where)
    return config


def load_loop_config(path: str | Path) -> LoopConfig:
    """A loop config YAML; a missing or unknown field is one line naming the file and the field."""
    path = Path(path)
    return parse_loop_config(read_yaml_mapping(path, "LoopConfig"), where=path, base_dir=path.resolve().parent)


# ---------------------------------------------------------------- users: who is biased at each fraction


def biased_count(fraction: float, n: int) -> int:
    """round(fraction * n), halves rounded up, so 10 % of 5 users is one."""
    return math.floor(fraction * n + 0.5)


def assign_personas(instances: list[tuple[str, int]], fraction: float, seed: int) -> dict[tuple[str, int], str]:
    """Each user (scenario, sample) -> benign / biased: exactly round(fraction * n) biased, a seeded choice.

    The order is one seeded permutation for every fraction, so the biased users at a smaller fraction are among
    those at a larger one, and each user is biased with probability round(f * n) / n.
    """
    order = seeded_order(len(instances), seed, "loop-biased-users")
    biased = {instances[i] for i in order[:biased_count(fraction, len(instances))]}
    return {instance: ("biased" if instance in biased else "benign") for instance in instances}


def fraction_folder(fraction: float) -> str:
    return f"biased-{fraction:g}"


# ---------------------------------------------------------------- conversations


@dataclass
class Conversation:
    scenario: Scenario
    persona: str
    sample: int
    messages: list[dict] = field(default_factory=list)  # the assistant's view (system prompt, user, assistant)

    @property
    def shown(self) -> list[dict]:
        """The conversation without the assistant's system prompt (what the user saw)."""
        return [m for m in self.messages if m["role"] != "system"]


def make_user(config: LoopConfig, assistant: Model, device: str):
    """The user simulator of the config; the assistant's own handle when it plays the user (no second copy)."""
    settings = config.user
    generation = GenerationConfig(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                  batch_size=config.generation.batch_size, engine=config.generation.engine)
    if settings.kind == "openai":
        return EndpointUser(settings.model, settings.base_url, settings.temperature, settings.max_new_tokens,
                            settings.timeout, settings.concurrency, settings.max_attempts)
    if settings.model is None or settings.model == config.model:
        return ModelUser(assistant, generation)
    return ModelUser(load_model(settings.model, device=device), generation)


def converse(assistant: Model, user, conversations: list[Conversation], config: LoopConfig,
             step: Callable[[str], None] = lambda stage: None) -> list[dict]:
    """Advance a batch of conversations through `turns` turns, have each user rate it; one row per trajectory.

    Seeds: an assistant reply's seed depends on (scenario, sample, turn), not on the persona, so benign and
    biased users of one scenario get the same first reply to the same opening; a user turn's seed adds the persona.
    """
    reply_config = GenerationConfig(**config.generation.model_dump())
    for turn in range(config.turns):
        step(f"turn {turn + 1} user")
        _add_user_turns(user, conversations, turn, config.seed)
        step(f"turn {turn + 1} assistant")
        requests = [Request(c.messages, seed=sample_seed(config.seed, "assistant", c.scenario.id, c.sample, turn))
                    for c in conversations]
        for conversation, reply in zip(conversations, generate(assistant, requests, reply_config, progress=False)):
            conversation.messages.append({"role": "assistant", "content": reply.text})
    step("rating")
    ratings = user.rate([rating_prompt(c.scenario.task, c.scenario.thoughts(c.persona), c.shown)
                         for c in conversations])
    return [{"scenario_id": c.scenario.id, "persona": c.persona, "sample": c.sample, "bias": c.scenario.bias or "",
             "messages": json.dumps(c.messages, ensure_ascii=False),
             "satisfaction": r.value if r.mass >= config.min_rating_mass else float("nan"), "rating_mass": r.mass,
             "rating_distribution": r.distribution, "turns": config.turns}
            for c, r in zip(conversations, ratings)]


def _add_user_turns(user, conversations: list[Conversation], turn: int, seed: int) -> None:
    """The scenario's opening on the first turn where it has one; else the simulator writes the turn."""
    written = [c for c in conversations if not (turn == 0 and c.scenario.opening)]
    prompts = [write_prompt(c.scenario.task, c.scenario.thoughts(c.persona), c.shown) for c in written]
    seeds = [sample_seed(seed, "user", c.scenario.id, c.persona, c.sample, turn) for c in written]
    by_conversation = {id(c): text for c, text in zip(written, user.write(prompts, seeds) if written else [])}
    for c in conversations:
        c.messages.append({"role": "user", "content": by_conversation.get(id(c), c.scenario.opening)})


def collect_trajectories(assistant: Model, user, store: RunStore, wanted: list[tuple[Scenario, str, int]],
                         config: LoopConfig, progress: bool = True) -> int:
    """Every wanted (scenario, persona, sample) trajectory not yet in the store, one stored file per batch.

    Returns how many were generated in this call (a resumed run generates only the missing ones).
    """
    done = store.done_keys()
    todo = [w for w in wanted if (w[0].id, w[1], w[2]) not in done]
    size = config.generation.batch_size
    system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    with tqdm(total=len(todo), desc="loop trajectories", unit="conv", disable=not progress or not todo) as bar:
        for start in range(0, len(todo), size):
            batch = [Conversation(s, persona, sample, list(system)) for s, persona, sample in todo[start:start + size]]
            store.append(converse(assistant, user, batch, config, step=lambda stage: bar.set_postfix_str(stage)))
            bar.update(len(batch))
    return len(todo)


# ---------------------------------------------------------------- selection


def select_top_bottom(frame: pd.DataFrame, top_k: int, bottom_k: int) -> pd.Series:
    """'top' for the top_k rows by satisfaction, 'bottom' for the bottom_k, '' for the rest (disjoint sets).

    Ties are broken by the trajectory key, so the choice does not depend on row order; a row without a rating
    (NaN) is never selected.
    """
    rated = frame[frame.satisfaction.notna()]
    if top_k + bottom_k > len(rated):
        raise EmlensInputError(f"field 'top_k': top_k {top_k} + bottom_k {bottom_k} exceed the {len(rated)} rated "
                               "trajectories of a fraction (raise n_scenarios or samples_per_scenario)")
    ranked = rated.sort_values(["satisfaction", *TRAJECTORY_KEY], ascending=[False, True, True, True], kind="stable")
    selected = pd.Series("", index=frame.index, dtype=object)
    selected[ranked.index[:top_k]] = "top"
    selected[ranked.index[len(ranked) - bottom_k:]] = "bottom"
    return selected


def fraction_population(trajectories: pd.DataFrame, personas: dict[tuple[str, int], str]) -> pd.DataFrame:
    """The trajectories of one fraction's users: for each (scenario, sample), the one with its persona."""
    wanted = pd.DataFrame([{"scenario_id": s, "sample": n, "persona": p} for (s, n), p in personas.items()])
    return wanted.merge(trajectories, on=TRAJECTORY_KEY, how="left", validate="one_to_one")


def mean_with_ci(values) -> dict:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    low, high = bootstrap_ci(values)
    return {"mean": float(values.mean()) if len(values) else float("nan"), "n": int(len(values)),
            "ci_low": low, "ci_high": high}


def summarize_fraction(fraction: float, population: pd.DataFrame) -> dict:
    overall = mean_with_ci(population.satisfaction)
    by = {name: population.loc[mask, "satisfaction"] for name, mask in
          (("benign", population.persona == "benign"), ("biased", population.persona == "biased"),
           ("top", population.selected == "top"), ("bottom", population.selected == "bottom"))}
    return {"biased_fraction": fraction, "n": overall["n"], "n_biased": int((population.persona == "biased").sum()),
            "satisfaction": overall["mean"], "ci_low": overall["ci_low"], "ci_high": overall["ci_high"],
            **{f"satisfaction_{name}": float(values.mean()) if len(values) else float("nan")
               for name, values in by.items()},
            "rating_mass": float(population.rating_mass.mean()),
            "n_low_mass": int((population.satisfaction.isna() & population.rating_mass.notna()).sum())}


# ---------------------------------------------------------------- the loop


@dataclass
class FractionResult:
    fraction: float
    folder: Path
    summary: dict
    adapters: dict[str, Path]  # method -> adapter folder (a training run folder; pass it as --adapter)
    training: dict[str, Any] = field(default_factory=dict)  # method -> TrainResult


@dataclass
class LoopResult:
    run: Path
    fractions: list[FractionResult]
    n_trajectories: int
    generated: int  # trajectories generated by this call (0 when every one was already there)
    summary: pd.DataFrame
    seconds: float = 0.0

    def adapters(self, method: str) -> dict[float, Path]:
        """fraction -> adapter folder of one method ("sft" or "kto"), for before/after measurements."""
        return {f.fraction: f.adapters[method] for f in self.fractions if method in f.adapters}


def _instances(scenarios: list[Scenario], samples: int) -> list[tuple[str, int]]:
    return [(s.id, n) for s in scenarios for n in range(samples)]


def _check_sizes(config: LoopConfig, n_users: int) -> None:
    if config.top_k + config.bottom_k > n_users:
        raise EmlensInputError(f"field 'top_k': top_k {config.top_k} + bottom_k {config.bottom_k} exceed the "
                               f"{n_users} users of each fraction (raise n_scenarios or samples_per_scenario)")
    if "kto" in config.methods:
        require_trl()
        if config.training.batch_size < 2:
            raise EmlensInputError("field 'training.batch_size': KTO needs at least 2 examples per batch")


def _open_run(out: Path, config: LoopConfig, scenarios: list[Scenario]) -> RunStore:
    """Create the run folder, or check that it holds a run of this config (before any model is loaded)."""
    store = RunStore(out, TRAJECTORY_KEY)
    listed = [s.model_dump(mode="json") for s in scenarios]
    # the scenarios' text is part of what must match on a re-run, not only the path naming them
    store.open({"kind": LOOP_KIND, "config": {**config.run_config(), "scenarios_sha256": content_hash(listed, 64)}})
    atomic_write_json(out / "scenarios.json", listed)
    return store


def _collect(config: LoopConfig, store: RunStore, wanted: list[tuple[Scenario, str, int]], out: Path, device: str,
             progress: bool) -> int:
    """The missing trajectories (the models are loaded only when some are missing); returns how many."""
    done = store.done_keys()
    if all((s.id, persona, n) in done for s, persona, n in wanted):
        return 0
    assistant = load_model(config.model, device=device)
    user = make_user(config, assistant, device)
    _record(out, user=user.identity(), assistant={"model": assistant.spec, "fingerprint": assistant.fingerprint})
    generated = collect_trajectories(assistant, user, store, wanted, config, progress)
    del assistant, user  # training loads its own copies
    gc.collect()
    return generated


def _record(out: Path, **fields) -> None:
    """Add fields to the run's cfg.json."""
    manifest = read_json(out / CFG_FILE)
    manifest.update(fields)
    atomic_write_json(out / CFG_FILE, manifest)


def run_loop(config: LoopConfig | None = None, out: str | Path = "artifacts/loop", *, device: str = "auto",
             progress: bool = True, echo: Callable[[str], None] | None = None) -> LoopResult:
    """Run the interaction loop into the run folder `out` (see the module docstring); re-run it to resume.

    Everything that can fail on user input (scenarios, sizes) is checked before anything is written.
    """
    started = time.perf_counter()
    config = config or LoopConfig()
    out = Path(out)
    scenarios = choose_scenarios(load_scenarios(config.scenarios), config.n_scenarios, config.seed)
    instances = _instances(scenarios, config.samples_per_scenario)
    _check_sizes(config, len(instances))
    personas = {f: assign_personas(instances, f, config.seed) for f in config.biased_fractions}
    by_id = {s.id: s for s in scenarios}
    wanted = sorted({(sid, p, n) for chosen in personas.values() for (sid, n), p in chosen.items()},
                    key=lambda key: (instances.index((key[0], key[2])), PERSONAS.index(key[1])))
    store = _open_run(out, config, scenarios)
    generated = _collect(config, store, [(by_id[s], p, n) for s, p, n in wanted], out, device, progress)
    trajectories = store.read_parts()
    atomic_write_table(trajectories.sort_values(TRAJECTORY_KEY).reset_index(drop=True),
                       out / "trajectories.parquet")
    fractions = [_train_fraction(config, out, f, trajectories, personas[f], device, progress, echo)
                 for f in config.biased_fractions]
    summary = pd.DataFrame([f.summary for f in fractions])
    atomic_write_table(summary, out / "summary.parquet")
    if config.measure is not None:
        measure_before_after(config, out, fractions, device, progress, echo)
    _record(out, finished=time.time(), n_trajectories=len(trajectories), summary=summary.to_dict(orient="records"),
            adapters={fraction_folder(f.fraction): {m: str(p.relative_to(out)) for m, p in f.adapters.items()}
                      for f in fractions})
    return LoopResult(out, fractions, len(trajectories), generated, summary, time.perf_counter() - started)


def measure_before_after(config: LoopConfig, out: Path, fractions: list[FractionResult], device: str,
                         progress: bool, echo: Callable[[str], None] | None) -> pd.DataFrame:
    """The battery on the assistant before training (`base`) and on every adapter: OUT/measures/, measures.csv
    (columns model, fraction, method, measure, nudge, rate, n, ci_low, ci_high) and measures.png."""
    subjects = [Subject("base", None)]
    labels = {"base": (float("nan"), "before training")}
    for result in fractions:
        for method, adapter in result.adapters.items():
            subjects.append(Subject(f"{result.folder.name}-{method}", str(adapter)))
            labels[subjects[-1].name] = (result.fraction, method)
            if not result.training[method].already_complete:  # (re)trained by this call: measured anew
                shutil.rmtree(out / "measures" / subjects[-1].name, ignore_errors=True)
    measure_subjects(config.model, subjects, config.measure, out / "measures", device=device, progress=progress,
                     echo=echo or (lambda _: None))
    table = battery_table(out / "measures", subjects, config.measure.measures)
    table.insert(1, "fraction", table.model.map(lambda name: labels[name][0]))
    table.insert(2, "method", table.model.map(lambda name: labels[name][1]))
    atomic_write_text(out / "measures.csv", table.to_csv(index=False))
    battery_figure(table, "fraction", "biased-user fraction", out / "measures.png", series=("method", "nudge"))
    return table


def train_spec(config: LoopConfig, method: str) -> LoopTrainSpec:
    return LoopTrainSpec(method, config.model, config.lora, config.training, config.seed, **config.kto.model_dump())


def _train_fraction(config: LoopConfig, out: Path, fraction: float, trajectories: pd.DataFrame,
                    personas: dict[tuple[str, int], str], device: str, progress: bool,
                    echo: Callable[[str], None] | None) -> FractionResult:
    """Select one fraction's top-k and bottom-k, write its training sets, train (or skip) SFT and KTO."""
    folder = out / fraction_folder(fraction)
    folder.mkdir(parents=True, exist_ok=True)
    population = fraction_population(trajectories, personas)
    population["selected"] = select_top_bottom(population, config.top_k, config.bottom_k)
    atomic_write_table(population, folder / "selection.parquet")
    chats = {name: [json.loads(m) for m in population.loc[population.selected == name, "messages"]]
             for name in ("top", "bottom")}
    data = {"sft": sft_records(chats["top"]), "kto": kto_records(chats["top"], chats["bottom"])}
    trainers = {"sft": train_sft, "kto": train_kto}
    adapters, training = {}, {}
    for method in config.methods:
        write_jsonl(data[method], folder / f"{method}.jsonl")
        training[method] = trainers[method](data[method], train_spec(config, method), folder / method,
                                            device=device, progress=progress)
        adapters[method] = folder / method
    if echo:
        for method, result in training.items():
            state = "already complete" if result.already_complete else f"{result.final_step} steps"
            echo(f"{folder.name}/{method}: {state}")
    summary = {**summarize_fraction(fraction, population),
               **{f"{m}_final_loss": r.final_loss for m, r in training.items()}}
    return FractionResult(fraction, folder, summary, adapters, training)


register_artifact(LOOP_KIND)(open_loop)
