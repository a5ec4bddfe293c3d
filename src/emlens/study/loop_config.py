"""The interaction loop's inputs: its scenarios (a situation, a benign and a biased user's private thoughts) and
its config (`LoopConfig`, read from YAML with one-line errors). `emlens.study.loop` runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from emlens.base.config import NOT_IDENTITY, Config
from emlens.base.errors import EmlensInputError
from emlens.base.io import fail, read_yaml, validate
from emlens.data.order import seeded_order
from emlens.generation.distributions import MIN_RATING_MASS
from emlens.model import DEFAULT_MODEL
from emlens.study.battery import BatteryConfig
from emlens.training.config import LoraSettings, TrainingSettings, _resolve_path

BUILTIN_SCENARIOS = Path(__file__).resolve().parent.parent / "resources" / "loop" / "scenarios.yaml"
BIASED_FRACTIONS = (0.0, 0.1, 0.2, 0.5, 1.0)  # Hu et al. 2025

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


_Strict = Config


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
    concurrency: Annotated[int, NOT_IDENTITY] = Field(8, ge=1, description="openai: requests in flight")
    timeout: Annotated[float, NOT_IDENTITY] = Field(120.0, gt=0)
    max_attempts: Annotated[int, NOT_IDENTITY] = Field(6, ge=1)

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

    FLAG_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "max_new_tokens": ("generation.max_new_tokens", "user.max_new_tokens")}

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
        return {name: value for name, value in self.identity(mode="json").items() if name != "measure"}

    def with_flags(self, where: str = "command line", **flags: Any) -> LoopConfig:
        """This config with the command line's flags laid over it (a flag that is None was not given).

        Flags are LoopConfig fields, plus `max_new_tokens` (assistant and user), `user_model` and `user_endpoint`
        (an OpenAI-compatible endpoint's model name).
        """
        user_model, user_endpoint = flags.pop("user_model", None), flags.pop("user_endpoint", None)
        if user_model is not None:
            flags.update({"user.kind": "model", "user.model": user_model})
        if user_endpoint is not None:
            flags.update({"user.kind": "openai", "user.model": user_endpoint})
        config = super().with_flags(where, **flags)
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
    config = LoopConfig.from_yaml(path)
    config._source = str(path)
    return config
