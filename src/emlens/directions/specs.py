"""Probe specs: which contrast or score, which sites and layers, which token position and method.

A spec (YAML, validated with extra="forbid") names its data and its method:

    name: refusal
    method: diff_of_means            # logistic | ridge | pca_pairs
    site: resid_post                 # a site kind, a pattern blocks.*.hook_X, or a full site name
    layers: all                      # or "10-20", or [5, 10]
    position: last_prompt            # mean_response | all
    contrast:
      positive: {questions: ${EMLENS_SHARED_DATA}/refusal/refusal_direction_harmful_train.json, limit: 64}
      negative: {questions: ${EMLENS_SHARED_DATA}/refusal/refusal_direction_harmless_train.json, limit: 64}

A source is a prompt file (anything `emlens.data.load_questions` reads, or a bundled set name) with optional
`system` prompt and `nudge`; a persona-vectors trait file with `instructions: pos|neg`; or a table (an eval run's
`samples.parquet`, a run folder, or a CSV of judged responses) with a row filter `where`. A ridge spec has
`score: {table, column}` instead, or `score: {rate: ...}` to have the model rate each prompt itself.

Paths resolve relative to the spec file; `${EMLENS_SHARED_DATA}` is `--data-root`, else the environment
variable, else the first `shared/data` folder found walking up from the spec file.

Every metric is held out, with folds split BY PROMPT GROUP (sklearn GroupKFold): the same question under two
nudges, or one response's tokens, never sit on both sides of a split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from emlens.base.config import Config
from emlens.base.errors import EmlensInputError
from emlens.base.io import find_shared_data, load_yaml_model
from emlens.capture.backends import BACKENDS, DEFAULT_BACKEND
from emlens.data.questions import BUNDLED_QUESTIONS, questions_path
from emlens.generation.engine import DEFAULT_BATCH_SIZE

Method = Literal["diff_of_means", "logistic", "ridge", "pca_pairs"]
DATA_VAR = "${EMLENS_SHARED_DATA}"


# ---------------------------------------------------------------- the spec


class Source(BaseModel):
    """One side of a contrast: exactly one of `questions`, `persona` or `table`."""

    model_config = ConfigDict(extra="forbid")

    questions: str | list[str] | None = None  # prompt files (any load_questions format) or bundled set names
    paraphrases: Literal["first", "all"] = "first"
    system: str | None = None  # a system prompt set on every chat (replaces the model's default one)
    nudge: str | None = None  # none | evil | hhh | a name in nudges_file
    nudges_file: str | None = None
    persona: str | None = None  # persona-vectors trait JSON
    instructions: Literal["pos", "neg", "none"] | None = None  # which instruction is the system prompt
    table: str | None = None  # samples.parquet, a run folder, or a CSV of judged responses
    where: dict[str, Any] = Field(default_factory=dict)  # column: value | [values] | "<30" | ">=70" | "!=x"
    response: bool = True  # tables: read the response after the prompt
    prompt_column: str | None = None  # tables: messages | paraphrase | question | prompt (auto)
    group_column: str | None = None  # tables: question_id if present, else the prompt text
    limit: int | None = Field(None, ge=1)
    pick: Literal["first", "random"] = "first"  # which `limit` rows: the first ones or a seeded sample

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in ("questions", "persona", "table") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a source needs exactly one of questions, persona, table (got {kinds or 'none'})")
        if self.persona is not None and self.instructions is None:
            raise ValueError("a persona source needs instructions: pos, neg or none (its questions only)")
        if self.instructions is not None and self.persona is None:
            raise ValueError("instructions only go with a persona source")
        if self.table is None and (self.where or self.prompt_column or self.group_column):
            raise ValueError("where, prompt_column and group_column only go with a table source")
        return self


class Contrast(BaseModel):
    """Each side is one source or a list of sources (their rows are concatenated)."""

    model_config = ConfigDict(extra="forbid")
    positive: Source | list[Source]
    negative: Source | list[Source]

    def side(self, name: str) -> list[Source]:
        value = getattr(self, name)
        return value if isinstance(value, list) else [value]


class Rating(BaseModel):
    """The model rates each prompt itself (emlens.generation.distributions.rate): the expectation of its exact
    answer distribution over the numbers 0..scale_max after `template` (no generation), rescaled to 0-100."""

    model_config = ConfigDict(extra="forbid")
    questions: str | list[str]
    template: str = Field(min_length=1)  # must contain {question}
    answer_prefix: str = ""  # text put in the assistant's mouth before the rating, e.g. "Rating: "
    scale_max: int = Field(9, ge=1, le=100)
    min_mass: float = Field(0.25, ge=0.0, le=1.0)  # Betley's rule: less mass on numbers -> no rating
    limit: int | None = Field(None, ge=1)
    pick: Literal["first", "random"] = "first"

    @model_validator(mode="after")
    def _has_slot(self):
        if "{question}" not in self.template:
            raise ValueError("template must contain {question}")
        return self


class ScoreSpec(BaseModel):
    """The target of a ridge probe: a table column, or the model's own rating (`rate`)."""

    model_config = ConfigDict(extra="forbid")
    column: str = "perceived_harm"
    table: str | None = None
    where: dict[str, Any] = Field(default_factory=dict)
    response: bool = False
    prompt_column: str | None = None
    group_column: str | None = None
    limit: int | None = Field(None, ge=1)
    pick: Literal["first", "random"] = "random"
    rate: Rating | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.table is None) == (self.rate is None):
            raise ValueError("a score needs exactly one of table, rate")
        return self


class ProbeSpec(Config):

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    method: Method
    site: str | list[str] = "resid_post"
    layers: str | int | list[int] = "all"
    position: Literal["last_prompt", "mean_response", "all"] = "last_prompt"
    contrast: Contrast | None = None
    score: ScoreSpec | None = None
    folds: int = Field(5, ge=2)
    seed: int = 0
    regularization: float = Field(1.0, gt=0)  # logistic C, ridge alpha (on standardised activations)
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1)
    max_response_tokens: int | None = Field(128, ge=1)
    backend: Literal[BACKENDS] = DEFAULT_BACKEND

    @model_validator(mode="after")
    def _data_fits_method(self):
        if (self.contrast is None) == (self.score is None):
            raise ValueError("a spec needs exactly one of contrast, score")
        if self.method == "ridge" and self.score is None:
            raise ValueError("method ridge needs a score, not a contrast")
        if self.method != "ridge" and self.contrast is None:
            raise ValueError(f"method {self.method} needs a contrast (positive/negative), not a score")
        if self.method == "pca_pairs" and self.position == "all":
            raise ValueError("method pca_pairs pairs rows, so it needs a pooled position (last_prompt, mean_response)")
        return self


def load_spec(path: str | Path) -> ProbeSpec:
    """Read and validate a spec; every problem is one line naming the file and the field."""
    return load_yaml_model(ProbeSpec, path)


@dataclass
class SpecContext:
    """Where a spec's relative paths and ${EMLENS_SHARED_DATA} point."""

    spec_file: Path
    data_root: Path | None = None

    def resolve(self, value: str, field_name: str) -> Path:

        if value in BUNDLED_QUESTIONS:
            return questions_path(value)
        if DATA_VAR in value:
            root = self.data_root or find_shared_data(self.spec_file.parent)
            if root is None:
                hint = (" or pass --table with your own eval run (emlens eval ...; it needs the columns the "
                        "spec's where filter reads)" if field_name.endswith("table") else "")
                raise EmlensInputError(f"{self.spec_file} field '{field_name}': {DATA_VAR} is not set (pass "
                                       f"--data-root or set EMLENS_SHARED_DATA to the shared data folder{hint})")
            value = value.replace(DATA_VAR, str(root))
        value = os.path.expandvars(os.path.expanduser(value))
        if "${" in value:
            raise EmlensInputError(f"{self.spec_file} field '{field_name}': unset variable in '{value}'")
        path = Path(value)
        if not path.is_absolute():
            path = self.spec_file.parent / path
        if not path.exists():
            raise EmlensInputError(f"{self.spec_file} field '{field_name}': no such file {path}")
        return path


def spec_input_files(spec: ProbeSpec, ctx: SpecContext) -> dict[str, Path]:
    """Every data file the spec reads, by field: what a fitted direction's content depends on (besides the model)."""
    files: dict[str, Path] = {}

    def add(value: str | list[str] | None, field_name: str) -> None:
        for i, item in enumerate([value] if isinstance(value, str) else value or []):
            path = ctx.resolve(item, field_name)
            files[f"{field_name}.{i}"] = path / "samples.parquet" if path.is_dir() else path  # a run folder's table

    for side in ("positive", "negative") if spec.contrast else ():
        for j, source in enumerate(spec.contrast.side(side)):
            where = f"contrast.{side}.{j}"
            for name in ("questions", "persona", "table", "nudges_file"):
                add(getattr(source, name), f"{where}.{name}")
    if spec.score is not None:
        add(spec.score.table, "score.table")
        add(spec.score.rate.questions if spec.score.rate else None, "score.rate.questions")
    return files
