"""Probe specs and fitting: difference of means, logistic regression, ridge regression, PCA of paired differences.

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

import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sklearn.base import BaseEstimator, TransformerMixin

from .data import (Message, apply_nudge, file_sha256, load_persona_trait, load_questions, question_messages,
                   resolve_nudges)
from .directions import Direction, LinearProbe, RegressionProbe, check_artifact_target
from .errors import EmlensInputError
from .extract import (DEFAULT_BACKEND, ActivationStore, ExtractItem, POSITIONS, extract_to_store, items_hash,
                      resolve_sites)

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
    """The model rates each prompt itself: probability-weighted mean over the single-token integers
    0..scale_max of its next-token distribution after `template` (no generation), rescaled to 0-100."""

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


class Score(BaseModel):
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


class ProbeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    method: Method
    site: str | list[str] = "resid_post"
    layers: str | int | list[int] = "all"
    position: Literal["last_prompt", "mean_response", "all"] = "last_prompt"
    contrast: Contrast | None = None
    score: Score | None = None
    folds: int = Field(5, ge=2)
    seed: int = 0
    regularization: float = Field(1.0, gt=0)  # logistic C, ridge alpha (on standardised activations)
    batch_size: int = Field(16, ge=1)
    max_response_tokens: int | None = Field(128, ge=1)
    backend: Literal["torch-hooks", "transformerlens", "nnsight"] = DEFAULT_BACKEND

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
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise EmlensInputError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark else str(path)
        raise EmlensInputError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise EmlensInputError(f"{path}: expected a mapping of spec fields, got {type(data).__name__}")
    try:
        return ProbeSpec.model_validate(data)
    except ValidationError as e:
        raise EmlensInputError(f"{path}: {_describe_errors(e)}") from None


def _describe_errors(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown field '{loc}'"
    if first["type"] == "missing":
        return f"missing field '{loc}'"
    return f"field '{loc}': {first['msg'].removeprefix('Value error, ')}" if loc else first["msg"].removeprefix(
        "Value error, ")


# ---------------------------------------------------------------- paths


def find_shared_data(start: Path) -> Path | None:
    """The first `shared/data` folder found walking up from `start` (as tests/conftest.py does)."""
    for parent in [start.resolve(), *start.resolve().parents]:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return None


@dataclass
class SpecContext:
    """Where a spec's relative paths and ${EMLENS_SHARED_DATA} point."""

    spec_file: Path
    data_root: Path | None = None

    def resolve(self, value: str, field_name: str) -> Path:
        from .sampling import BUNDLED_QUESTIONS, questions_path

        if value in BUNDLED_QUESTIONS:
            return questions_path(value)
        if DATA_VAR in value:
            root = self.data_root or (Path(os.environ["EMLENS_SHARED_DATA"]) if os.environ.get("EMLENS_SHARED_DATA")
                                      else find_shared_data(self.spec_file.parent))
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


# ---------------------------------------------------------------- building the rows


@dataclass
class ProbeData:
    """The rows to read, with per-row target, prompt group and pair key."""

    items: list[ExtractItem]
    y: np.ndarray
    groups: np.ndarray
    pairs: np.ndarray
    sources: list[dict] = field(default_factory=list)

    @property
    def n_positive(self) -> int:
        return int((self.y == 1).sum())

    @property
    def n_negative(self) -> int:
        return int((self.y == 0).sum())


def _pick(rows: list, limit: int | None, pick: str, seed: int) -> list:
    if limit is None or len(rows) <= limit:
        return rows
    if pick == "first":
        return rows[:limit]
    chosen = sorted(np.random.default_rng(seed).choice(len(rows), size=limit, replace=False).tolist())
    return [rows[i] for i in chosen]


def _with_system(messages: list[Message], system: str | None) -> list[Message]:
    if system is None:
        return messages
    rest = [m for m in messages if m.role != "system"]
    return [Message(role="system", content=system), *rest]


def _source_nudge(source: Source, ctx: SpecContext, where: str):
    if not source.nudge:
        return None
    extra = ctx.resolve(source.nudges_file, f"{where}.nudges_file") if source.nudges_file else None
    return resolve_nudges([source.nudge], extra)[0]


def _question_rows(source: Source, ctx: SpecContext, where: str, sources: list[dict]) -> list[tuple]:
    files = [source.questions] if isinstance(source.questions, str) else list(source.questions)
    nudge = _source_nudge(source, ctx, where)
    rows = []
    for i, name in enumerate(files):
        path = ctx.resolve(name, f"{where}.questions")
        sources.append({"path": str(path), "sha256": file_sha256(path)})
        for q in load_questions(path):
            indices = range(len(q.paraphrases)) if source.paraphrases == "all" else [0]
            for p in indices:
                messages = _with_system(question_messages(q, p), source.system)
                if nudge is not None:
                    messages = apply_nudge(messages, nudge)
                key = f"{path.stem}:{q.id}"
                rows.append(([m.model_dump() for m in messages], None, key, f"{key}:{p}"))
    return rows


def _persona_rows(source: Source, ctx: SpecContext, where: str, sources: list[dict]) -> list[tuple]:
    path = ctx.resolve(source.persona, f"{where}.persona")
    sources.append({"path": str(path), "sha256": file_sha256(path)})
    trait = load_persona_trait(path)
    nudge = _source_nudge(source, ctx, where)
    pairs = list(enumerate(trait.instructions)) if source.instructions != "none" else [(0, None)]
    rows = []
    for qi, question in enumerate(trait.questions):
        for k, pair in pairs:
            system = None if pair is None else (pair[0] if source.instructions == "pos" else pair[1])
            messages = _with_system([Message(role="user", content=question)], system or source.system)
            if nudge is not None:
                messages = apply_nudge(messages, nudge)
            rows.append(([m.model_dump() for m in messages], None, f"{path.stem}:q{qi}", f"{path.stem}:q{qi}:i{k}"))
    return rows


def read_table(path: Path) -> pd.DataFrame:
    """An eval run folder, a .parquet table, or a .csv (e.g. judged responses with question/answer columns)."""
    from .runs import read_samples

    if path.is_dir() or path.suffix == ".parquet":
        return read_samples(path)
    if path.suffix == ".csv":
        return pd.read_csv(path)
    raise EmlensInputError(f"{path}: expected a run folder, a .parquet or a .csv table")


_COMPARISON = re.compile(r"^\s*(<=|>=|!=|==|<|>)\s*(.+?)\s*$")


def filter_rows(frame: pd.DataFrame, where: dict[str, Any], context: str) -> pd.DataFrame:
    """Keep rows matching every condition: a value, a list of values, or a comparison string like "<30"."""
    keep = pd.Series(True, index=frame.index)
    for column, condition in where.items():
        if column not in frame.columns:
            raise EmlensInputError(f"{context}: where column '{column}' is not in the table (columns: "
                                   f"{', '.join(map(str, frame.columns[:15]))})")
        values = frame[column]
        match = _COMPARISON.match(condition) if isinstance(condition, str) else None
        if match:
            op, raw = match.groups()
            try:
                target: Any = float(raw)
                values = pd.to_numeric(values, errors="coerce")
            except ValueError:
                target = raw
            keep &= {"<": values < target, "<=": values <= target, ">": values > target, ">=": values >= target,
                     "!=": values != target, "==": values == target}[op]
        elif isinstance(condition, list):
            keep &= values.isin(condition)
        else:
            keep &= values == condition
    return frame[keep.fillna(False).astype(bool)]


def _table_frame(table: str, where: dict, ctx: SpecContext, field_name: str, sources: list[dict]) -> pd.DataFrame:
    path = ctx.resolve(table, field_name)
    frame = read_table(path)
    file = path / "samples.parquet" if path.is_dir() else path
    sources.append({"path": str(file), "sha256": file_sha256(file)})
    return filter_rows(frame, where, f"{ctx.spec_file} field '{field_name}' ({path})")


def _prompt_messages(row: dict, column: str) -> list[dict]:
    raw = row[column]
    if column == "messages":
        return json.loads(raw) if isinstance(raw, str) else list(raw)
    return [{"role": "user", "content": str(raw)}]


def _table_columns(frame: pd.DataFrame, prompt_column: str | None, group_column: str | None,
                   where: str) -> tuple[str, str | None]:
    prompt = prompt_column or next((c for c in ("messages", "paraphrase", "question", "prompt")
                                    if c in frame.columns), None)
    if prompt is None or prompt not in frame.columns:
        raise EmlensInputError(f"{where}: no prompt column {prompt_column or '(messages, paraphrase, question, prompt)'}"
                               f" in the table")
    group = group_column or ("question_id" if "question_id" in frame.columns else None)
    if group is not None and group not in frame.columns:
        raise EmlensInputError(f"{where}: group column '{group}' is not in the table")
    return prompt, group


def _table_rows(source: Source, ctx: SpecContext, where: str, sources: list[dict]) -> list[tuple]:
    frame = _table_frame(source.table, source.where, ctx, f"{where}.table", sources)
    prompt, group = _table_columns(frame, source.prompt_column, source.group_column, f"{ctx.spec_file} {where}")
    response = next((c for c in ("response", "answer") if c in frame.columns), None) if source.response else None
    if source.response and response is None:
        raise EmlensInputError(f"{ctx.spec_file} {where}: the table has no response/answer column "
                               "(set response: false to read prompts only)")
    rows = []
    for i, row in enumerate(frame.to_dict("records")):
        messages = _prompt_messages(row, prompt)
        text = None if response is None else ("" if pd.isna(row[response]) else str(row[response]))
        if text is not None and not text.strip():
            continue  # an empty response has no tokens to read
        key = str(row[group]) if group else json.dumps(messages, sort_keys=True)
        # pairs (for pca_pairs) match the same question, paraphrase and sample across the two sides
        within = [str(row[c]) for c in ("paraphrase_index", "sample_index") if c in row] or [str(i)]
        rows.append((messages, text, key, ":".join([key, *within])))
    return rows


def _source_rows(source: Source, ctx: SpecContext, where: str, seed: int, limit: int | None,
                 sources: list[dict]) -> list[tuple]:
    if source.questions is not None:
        rows = _question_rows(source, ctx, where, sources)
    elif source.persona is not None:
        rows = _persona_rows(source, ctx, where, sources)
    else:
        rows = _table_rows(source, ctx, where, sources)
    rows = _pick(rows, limit or source.limit, source.pick, seed)
    if not rows:
        raise EmlensInputError(f"{ctx.spec_file} field '{where}': no rows (check its file and where filter)")
    return rows


def contrast_data(spec: ProbeSpec, ctx: SpecContext, limit: int | None = None) -> ProbeData:
    """Rows of both sides; `limit` caps each side, split evenly over the side's sources."""
    sources: list[dict] = []
    items, y, groups, pairs = [], [], [], []
    for side, label in (("positive", 1), ("negative", 0)):
        side_sources, first_source = spec.contrast.side(side), len(sources)
        share = None if limit is None else max(1, math.ceil(limit / len(side_sources)))
        for i, source in enumerate(side_sources):
            where = f"contrast.{side}" + (f".{i}" if len(side_sources) > 1 else "")
            for messages, response, group, pair in _source_rows(source, ctx, where, spec.seed, share, sources):
                meta = {"side": side, "y": float(label), "group": group, "pair": pair}
                items.append(ExtractItem(messages=messages, response=response, meta=meta))
                y.append(label), groups.append(group), pairs.append(pair)
        for record in sources[first_source:]:
            record["side"] = side
    return ProbeData(items, np.array(y, dtype=float), np.array(groups), np.array(pairs), sources)


def score_data(spec: ProbeSpec, ctx: SpecContext, handle, limit: int | None = None,
               progress: bool = True) -> ProbeData:
    score, sources = spec.score, []
    if score.rate is not None:
        rows = _rated_rows(score.rate, ctx, handle, spec, limit, sources, progress)
    else:
        rows = _scored_table_rows(score, ctx, spec, limit, sources)
    if len(rows) < spec.folds:
        why = (f"the model put less than {score.rate.min_mass:.0%} of its next-token probability on the digits "
               f"0-{score.rate.scale_max} for the other prompts" if score.rate is not None else "rows without a value "
               "are dropped")
        raise EmlensInputError(f"{ctx.spec_file} field 'score': only {len(rows)} rows with a {score.column} value "
                               f"(need at least {spec.folds}; {why})")
    items = [ExtractItem(messages=m, response=r, meta={"y": float(v), "group": g, "pair": g})
             for m, r, g, v in rows]
    return ProbeData(items, np.array([r[3] for r in rows], dtype=float), np.array([r[2] for r in rows]),
                     np.array([r[2] for r in rows]), sources)


def _scored_table_rows(score: Score, ctx: SpecContext, spec: ProbeSpec, limit: int | None,
                       sources: list[dict]) -> list[tuple]:
    frame = _table_frame(score.table, score.where, ctx, "score.table", sources)
    if score.column not in frame.columns:
        raise EmlensInputError(f"{ctx.spec_file} field 'score.column': column '{score.column}' is not in "
                               f"{score.table} (run the eval that writes it first, e.g. the harm_perception setting)")
    prompt, group = _table_columns(frame, score.prompt_column, score.group_column, f"{ctx.spec_file} score")
    response = next((c for c in ("response", "answer") if c in frame.columns), None) if score.response else None
    frame = frame.assign(_value=pd.to_numeric(frame[score.column], errors="coerce")).dropna(subset=["_value"])
    frame = frame.assign(_key=frame[prompt].astype(str) + ("\x00" + frame[response].astype(str) if response else ""))
    # Several samples of one prompt (e.g. repeated ratings) are one row: their mean score.
    merged = frame.groupby("_key", sort=False).agg(_value=("_value", "mean"), _first=(prompt, "first"),
                                                   **({"_response": (response, "first")} if response else {}),
                                                   **({"_group": (group, "first")} if group else {}))
    rows = []
    for key, row in merged.iterrows():
        messages = _prompt_messages({prompt: row["_first"]}, prompt)
        rows.append((messages, str(row["_response"]) if response else None,
                     str(row["_group"]) if group else str(key)[:200], float(row["_value"])))
    return _pick(rows, limit or score.limit, score.pick, spec.seed)


def _rated_rows(rate: Rating, ctx: SpecContext, handle, spec: ProbeSpec, limit: int | None, sources: list[dict],
                progress: bool) -> list[tuple]:
    source = Source(questions=rate.questions)
    rows = _pick(_question_rows(source, ctx, "score.rate", sources), limit or rate.limit, rate.pick, spec.seed)
    prompts = [r[0][-1]["content"] for r in rows]
    ratings = rate_prompts(handle, prompts, rate.template, rate.scale_max, rate.min_mass, spec.batch_size, progress,
                           rate.answer_prefix)
    return [(m, None, g, v) for (m, _, g, _), v in zip(rows, ratings) if not math.isnan(v)]


def rate_prompts(handle, prompts: list[str], template: str, scale_max: int = 9, min_mass: float = 0.25,
                 batch_size: int = 16, progress: bool = True, answer_prefix: str = "") -> list[float]:
    """The model's own 0-100 rating of each prompt, read from its next-token distribution (no generation).

    Expected value over the single-token integers 0..scale_max, rescaled to 0-100; NaN when less than
    `min_mass` of the probability is on those tokens (the Betley judge's rule).
    """
    from tqdm.auto import tqdm

    from .generate import left_pad

    tok = handle.tokenizer
    numbers = {}
    for value in range(scale_max + 1):
        ids = tok(str(value), add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            numbers[ids[0]] = value
    if len(numbers) < scale_max + 1:
        raise EmlensInputError(f"rating scale 0-{scale_max}: the tokenizer splits some of these numbers into "
                               f"several tokens (single tokens: {len(numbers)}); use scale_max: 9")
    token_ids = torch.tensor(list(numbers), device=handle.device)
    values = torch.tensor(list(numbers.values()), dtype=torch.float32, device=handle.device)
    encoded = [tok(handle.chat_text([{"role": "user", "content": template.format(question=p)}]) + answer_prefix,
                   add_special_tokens=False)["input_ids"] for p in prompts]
    ratings = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(encoded), batch_size), desc="rate", disable=not progress):
            ids, mask = left_pad(encoded[start:start + batch_size], tok.pad_token_id, handle.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = handle.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                  logits_to_keep=1).logits[:, -1].float()
            probs = torch.softmax(logits, -1)[:, token_ids]
            mass = probs.sum(-1)
            expected = (probs * values).sum(-1) / mass * (100.0 / scale_max)
            ratings += [float(e) if m >= min_mass else float("nan") for e, m in zip(expected, mass)]
    return ratings


# ---------------------------------------------------------------- fitting


@dataclass
class LayerFit:
    direction: np.ndarray  # unit
    raw_norm: float
    metrics: dict
    extras: dict[str, np.ndarray] = field(default_factory=dict)


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def _folds(groups: np.ndarray, folds: int):
    from sklearn.model_selection import GroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise EmlensInputError(f"probe: only {n_groups} prompt group(s); held-out metrics need at least 2")
    return GroupKFold(n_splits=min(folds, n_groups))


def _pair_differences(X: np.ndarray, y: np.ndarray, pairs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """pos - neg for every pair key present on both sides among `rows`."""
    positive = {pairs[i]: i for i in rows if y[i] == 1}
    negative = {pairs[i]: i for i in rows if y[i] == 0}
    common = [k for k in positive if k in negative]
    if not common:
        raise EmlensInputError("pca_pairs: no positive/negative pairs share a pair key (the two sides must read "
                               "the same questions)")
    return np.stack([X[positive[k]] - X[negative[k]] for k in common])


def _top_direction(diffs: np.ndarray) -> tuple[np.ndarray, float]:
    """First principal axis of the (uncentred) paired differences, signed along their mean.

    Uncentred on purpose: centring would remove the mean difference, which is the signal shared by the pairs.
    """
    _, singular, vt = np.linalg.svd(diffs, full_matrices=False)
    energy = float((singular ** 2).sum())
    if energy == 0:
        return np.zeros(diffs.shape[1]), float("nan")
    axis = vt[0]
    if axis @ diffs.mean(0) < 0:
        axis = -axis
    return _unit(axis), float(singular[0] ** 2 / energy)


class IsotropicScaler(TransformerMixin, BaseEstimator):
    """Centre, then divide by ONE scalar (the RMS of the centred entries).

    Unlike per-feature standardisation this treats every direction of the residual stream alike (a rotation
    of the activations rotates the fitted coefficients), so an L2-penalised probe's weight vector stays a
    meaningful direction; the scalar only keeps the regularisation strength comparable across layers.
    """

    def fit(self, X, y=None):
        self.mean_ = X.mean(0)
        self.scale_ = float(np.sqrt(((X - self.mean_) ** 2).mean())) or 1.0
        return self

    def transform(self, X):
        return (X - self.mean_) / self.scale_

    def fold(self, coef: np.ndarray, intercept: float) -> tuple[np.ndarray, float]:
        """Coefficients on scaled inputs -> coefficients on raw activations."""
        raw = coef / self.scale_
        return raw, float(intercept - raw @ self.mean_)


class _Scorer:
    """Fit on training rows, score held-out rows; higher score = more positive."""

    def __init__(self, method: str, regularization: float, seed: int):
        self.method, self.c, self.seed = method, regularization, seed

    def fit(self, X, y, pairs, rows):
        from sklearn.linear_model import LogisticRegression

        Xt, yt = X[rows], y[rows]
        if self.method == "logistic":
            self.scaler = IsotropicScaler().fit(Xt)
            self.model = LogisticRegression(C=self.c, max_iter=5000, random_state=self.seed)
            self.model.fit(self.scaler.transform(Xt), yt)
            self.threshold = 0.0
            return self
        if self.method == "pca_pairs":
            self.w, _ = _top_direction(_pair_differences(X, y, pairs, rows))
        else:
            self.w = Xt[yt == 1].mean(0) - Xt[yt == 0].mean(0)
        self.threshold = float((Xt[yt == 1].mean(0) @ self.w + Xt[yt == 0].mean(0) @ self.w) / 2)
        return self

    def score(self, X):
        return self.model.decision_function(self.scaler.transform(X)) if self.method == "logistic" else X @ self.w

    def raw_coef(self) -> tuple[np.ndarray, float]:
        """The logistic probe in raw activation space: logit = x @ coef + intercept."""
        return self.scaler.fold(self.model.coef_[0], float(self.model.intercept_[0]))


def _separation(scores: np.ndarray, y: np.ndarray) -> float:
    pos, neg = scores[y == 1], scores[y == 0]
    pooled = np.sqrt((pos.var() + neg.var()) / 2) if len(pos) > 1 and len(neg) > 1 else 0.0
    return float((pos.mean() - neg.mean()) / pooled) if pooled > 0 else float("nan")


def classification_metrics(X, y, groups, pairs, method: str, folds: int, regularization: float, seed: int) -> dict:
    """Held-out AUROC, accuracy and separation (d') of the method's scores, folds split by prompt group."""
    from sklearn.metrics import roc_auc_score

    aurocs, accuracies, separations = [], [], []
    for train, test in _folds(groups, folds).split(X, y, groups):
        if len(np.unique(y[train])) < 2:
            continue
        scorer = _Scorer(method, regularization, seed).fit(X, y, pairs, train)
        scores = scorer.score(X[test])
        accuracies.append(float(((scores > scorer.threshold) == (y[test] == 1)).mean()))
        if len(np.unique(y[test])) == 2:
            aurocs.append(float(roc_auc_score(y[test], scores)))
            separations.append(_separation(scores, y[test]))
    return {"auroc": float(np.mean(aurocs)) if aurocs else float("nan"),
            "auroc_std": float(np.std(aurocs)) if aurocs else float("nan"),
            "accuracy": float(np.mean(accuracies)) if accuracies else float("nan"),
            "separation": float(np.nanmean(separations)) if np.isfinite(separations).any() else float("nan"),
            "folds": len(accuracies)}


def fit_classification_layer(X, y, groups, pairs, method: str, folds: int, regularization: float,
                             seed: int) -> LayerFit:
    metrics = classification_metrics(X, y, groups, pairs, method, folds, regularization, seed)
    mean_pos, mean_neg = X[y == 1].mean(0), X[y == 0].mean(0)
    diff = mean_pos - mean_neg
    extras = {"mean_positive": mean_pos, "mean_negative": mean_neg}
    all_rows = np.arange(len(y))
    if method == "diff_of_means":
        direction = _unit(diff)
    elif method == "pca_pairs":
        direction, explained = _top_direction(_pair_differences(X, y, pairs, all_rows))
        metrics["explained_variance"] = explained
    else:
        coef, intercept = _Scorer("logistic", regularization, seed).fit(X, y, pairs, all_rows).raw_coef()
        direction = _unit(coef)
        extras.update(coef=coef, intercept=np.array(intercept))
    metrics["cos_with_mean_diff"] = float(direction @ _unit(diff))
    return LayerFit(direction, float(np.linalg.norm(diff)), metrics, extras)


def fit_ridge_layer(X, y, groups, folds: int, alpha: float, seed: int) -> LayerFit:
    """Ridge onto a score: pooled out-of-fold R^2 and Pearson r (folds by prompt group)."""
    from scipy.stats import pearsonr
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(IsotropicScaler(), Ridge(alpha=alpha))
    predicted = cross_val_predict(model, X, y, groups=groups, cv=_folds(groups, folds))
    constant = np.std(predicted) == 0 or np.std(y) == 0
    metrics = {"r2": float(r2_score(y, predicted)),
               "pearson_r": float("nan") if constant else float(pearsonr(y, predicted)[0]),
               "score_mean": float(y.mean()), "score_std": float(y.std())}
    model.fit(X, y)
    coef, intercept = model[0].fold(model[-1].coef_, float(model[-1].intercept_))
    # The natural scale: how far the mean activation moves per standard deviation of the score.
    centred = y - y.mean()
    slope = (X - X.mean(0)).T @ centred / max((centred ** 2).sum(), 1e-12)
    return LayerFit(_unit(coef), float(np.linalg.norm(slope) * y.std()), metrics,
                    {"coef": coef, "intercept": np.array(intercept), "mean": X.mean(0)})


def best_layer(metrics: pd.DataFrame) -> int:
    """By held-out AUROC (ties: larger held-out separation), or by held-out R^2 for regressions."""
    if "r2" in metrics:
        return int(metrics.loc[metrics["r2"].fillna(-np.inf).idxmax(), "layer"])
    ranked = metrics.assign(_a=metrics["auroc"].fillna(-1).round(4), _s=metrics["separation"].fillna(-np.inf))
    return int(ranked.sort_values(["_a", "_s"], ascending=False, kind="stable").iloc[0]["layer"])


def fit_store(store: ActivationStore, data: ProbeData, spec: ProbeSpec, sites: list, progress: bool = True
              ) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Fit every site of the store; returns stacked tensors (layers first) and the per-layer metrics table."""
    from tqdm.auto import tqdm

    rows = store.vector_rows().numpy()
    y, groups, pairs = data.y[rows], data.groups[rows], data.pairs[rows]
    fits, records = [], []
    for site in tqdm(sites, desc=f"fit ({spec.method})", disable=not progress):
        X = store.load(site.name).double().numpy()
        if spec.method == "ridge":
            fit = fit_ridge_layer(X, y, groups, spec.folds, spec.regularization, spec.seed)
        else:
            fit = fit_classification_layer(X, y, groups, pairs, spec.method, spec.folds, spec.regularization,
                                           spec.seed)
        fits.append(fit)
        records.append({"layer": site.layer, "site": site.name, "method": spec.method, "n": len(data.y),
                        **({"n_positive": data.n_positive, "n_negative": data.n_negative}
                           if spec.method != "ridge" else {}),
                        "n_groups": int(len(np.unique(data.groups))), **fit.metrics, "raw_norm": fit.raw_norm})
    tensors = {"directions": np.stack([f.direction for f in fits]), "raw_norm": np.array([f.raw_norm for f in fits]),
               "layers": np.array([s.layer for s in sites])}
    for key in fits[0].extras:
        tensors[key] = np.stack([f.extras[key] for f in fits])
    return tensors, pd.DataFrame(records)


# ---------------------------------------------------------------- the whole command


def _store_matches(store: ActivationStore, handle, data_hash: str, spec: ProbeSpec, sites: list) -> list[str]:
    manifest, changed = store.manifest, []
    if manifest.get("model", {}).get("fingerprint") != handle.fingerprint:
        changed.append("model fingerprint")
    if manifest.get("data_hash") != data_hash:
        changed.append("data")
    if manifest.get("position") != spec.position:
        changed.append("position")
    if manifest.get("max_response_tokens") != spec.max_response_tokens:
        changed.append("max_response_tokens")
    if not {s.name for s in sites} <= set(store.sites):
        changed.append("sites")
    return changed


def default_out(spec: ProbeSpec, handle) -> Path:
    return Path("artifacts") / "directions" / f"{spec.name}-{handle.fingerprint[:8]}"


def fit_probe(spec_path: str | Path, handle, out: str | Path | None = None, store: str | Path | None = None,
              table: str | None = None, limit: int | None = None, data_root: str | Path | None = None,
              backend: str | None = None, progress: bool = True) -> Direction:
    """`emlens probe fit`: build the spec's rows, extract (or reuse `store`), fit every layer, save the artifact."""
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    spec = _override_table(spec, table, spec_path)
    ctx = SpecContext(spec_path, Path(data_root) if data_root else None)
    sites = resolve_sites(spec.site, handle.n_layers, spec.layers)
    if len({s.kind for s in sites}) != 1:
        raise EmlensInputError(f"{spec_path} field 'site': a direction artifact holds one site kind per layer "
                               f"(got {sorted({s.kind for s in sites})})")
    backend = backend or spec.backend
    data = contrast_data(spec, ctx, limit) if spec.contrast else score_data(spec, ctx, handle, limit, progress)
    data_hash = items_hash(data.items)
    out = check_artifact_target(Path(out) if out else default_out(spec, handle))

    reuse = store is not None and Path(store).exists() and any(Path(store).iterdir())
    if reuse:
        activations = ActivationStore(store)
        changed = _store_matches(activations, handle, data_hash, spec, sites)
        if changed:
            raise EmlensInputError(f"{store}: store holds other activations (differs in {', '.join(changed)}); "
                                   "use a new --store folder or delete this one")
    # Without --store the activations live in a temporary folder, removed whatever happens.
    tmp_store = None if store is not None else Path(tempfile.mkdtemp(prefix="emlens-store-"))
    try:
        if not reuse:
            activations = extract_to_store(handle, data.items, Path(store) if store else tmp_store / "store", sites,
                                           spec.position, backend, spec.batch_size, spec.max_response_tokens,
                                           manifest={"spec": spec.name}, progress=progress)
        tensors, metrics = fit_store(activations, data, spec, sites, progress)
    finally:
        if tmp_store is not None:
            shutil.rmtree(tmp_store, ignore_errors=True)
    cfg = _provenance(spec, spec_path, handle, sites, backend, data, data_hash, metrics, limit, table)
    kind = {"logistic": LinearProbe, "ridge": RegressionProbe}.get(spec.method, Direction)
    artifact = kind({k: torch.as_tensor(v, dtype=torch.long if k == "layers" else torch.float32)
                     for k, v in tensors.items()}, cfg, metrics=metrics)
    artifact.save(out)
    return artifact


def _override_table(spec: ProbeSpec, table: str | None, spec_path: Path) -> ProbeSpec:
    """`--table`: every table source (and a score's table or rating) reads this table instead."""
    if table is None:
        return spec
    table = str(Path(table).resolve())
    if spec.score is not None:
        return spec.model_copy(update={"score": spec.score.model_copy(update={"table": table, "rate": None})})
    sides = {side: spec.contrast.side(side) for side in ("positive", "negative")}
    if not any(s.table is not None for side in sides.values() for s in side):
        raise EmlensInputError(f"{spec_path}: --table given but the spec reads no table")
    sides = {k: [s.model_copy(update={"table": table}) if s.table is not None else s for s in side]
             for k, side in sides.items()}
    return spec.model_copy(update={"contrast": Contrast(**sides)})


def _provenance(spec: ProbeSpec, spec_path: Path, handle, sites, backend: str, data: ProbeData, data_hash: str,
                metrics: pd.DataFrame, limit: int | None, table: str | None) -> dict:
    from .runs import versions

    best = best_layer(metrics)
    best_row = metrics.loc[metrics["layer"] == best].iloc[0].to_dict()
    return {
        "name": spec.name, "description": spec.description, "method": spec.method,
        "site_kind": sites[0].kind, "sites": [s.name for s in sites], "layers": [s.layer for s in sites],
        "position": spec.position, "backend": backend, "normalized": True,
        "raw_norm_meaning": ("norm of the activation shift per standard deviation of the score" if spec.method == "ridge"
                             else "norm of mean(positive) - mean(negative)"),
        "best_layer": best, "best_metrics": {k: v for k, v in best_row.items() if k not in ("site", "method")},
        "model": handle.describe(),
        "data": {"hash": data_hash, "n": len(data.y), "n_positive": data.n_positive if spec.contrast else None,
                 "n_negative": data.n_negative if spec.contrast else None,
                 "n_groups": int(len(np.unique(data.groups))), "sources": data.sources, "limit": limit,
                 "table_override": table, "max_response_tokens": spec.max_response_tokens},
        "seed": spec.seed, "folds": spec.folds, "regularization": spec.regularization,
        "spec": spec.model_dump(), "spec_file": str(spec_path), "spec_sha256": file_sha256(spec_path),
        "metrics": metrics.to_dict("records"), "versions": versions(), "emlens_version": versions()["emlens"],
        "created": time.time(),
    }


__all__ = ["ProbeSpec", "Source", "Contrast", "Score", "Rating", "load_spec", "fit_probe", "contrast_data",
           "score_data", "fit_store", "best_layer", "rate_prompts", "filter_rows", "POSITIONS"]
