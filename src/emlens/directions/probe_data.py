"""A probe spec's rows: chats (with responses), labels or scores, prompt groups and pairs, from prompt files,
persona-vectors trait files, eval tables, or the model's own ratings."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from emlens.base.errors import EmlensInputError
from emlens.base.io import file_sha256
from emlens.capture.items import ExtractItem
from emlens.data.nudges import apply_nudge, resolve_nudges
from emlens.data.persona import load_persona_trait
from emlens.data.questions import load_questions, question_messages
from emlens.directions.specs import (
    ProbeSpec,
    Rating,
    ScoreSpec,
    Source,
    SpecContext,
)
from emlens.generation.distributions import rate_prompts
from emlens.model import Model
from emlens.runs import read_rows

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


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system is None:
        return messages
    rest = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": system}, *rest]


def _source_nudge(source: Source, ctx: SpecContext, where: str):
    if not source.nudge:
        return None
    extra = ctx.resolve(source.nudges_file, f"{where}.nudges_file") if source.nudges_file else None
    return resolve_nudges([source.nudge], extra)[0]


def _question_rows(source: Source, ctx: SpecContext, where: str, sources: list[dict]) -> list[tuple]:
    files = [source.questions] if isinstance(source.questions, str) else list(source.questions)
    nudge = _source_nudge(source, ctx, where)
    rows = []
    for _i, name in enumerate(files):
        path = ctx.resolve(name, f"{where}.questions")
        sources.append({"path": str(path), "sha256": file_sha256(path)})
        for q in load_questions(path):
            indices = range(len(q.paraphrases)) if source.paraphrases == "all" else [0]
            for p in indices:
                messages = _with_system(question_messages(q, p), source.system)
                if nudge is not None:
                    messages = apply_nudge(messages, nudge)
                key = f"{path.stem}:{q.id}"
                rows.append((messages, None, key, f"{key}:{p}"))
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
            messages = _with_system([{"role": "user", "content": question}], system or source.system)
            if nudge is not None:
                messages = apply_nudge(messages, nudge)
            rows.append((messages, None, f"{path.stem}:q{qi}", f"{path.stem}:q{qi}:i{k}"))
    return rows


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
    frame = read_rows(path)
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


def score_data(spec: ProbeSpec, ctx: SpecContext, handle: Model, limit: int | None = None,
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


def _scored_table_rows(score: ScoreSpec, ctx: SpecContext, spec: ProbeSpec, limit: int | None,
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


def _rated_rows(rate: Rating, ctx: SpecContext, handle: Model, spec: ProbeSpec, limit: int | None, sources: list[dict],
                progress: bool) -> list[tuple]:
    source = Source(questions=rate.questions)
    rows = _pick(_question_rows(source, ctx, "score.rate", sources), limit or rate.limit, rate.pick, spec.seed)
    prompts = [r[0][-1]["content"] for r in rows]
    ratings = rate_prompts(handle, prompts, rate.template, rate.scale_max, rate.min_mass, progress,
                           rate.answer_prefix)
    return [(m, None, g, v) for (m, _, g, _), v in zip(rows, ratings, strict=False) if not math.isnan(v)]


