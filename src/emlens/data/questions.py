"""Evaluation questions and prompt lists: Betley YAML, CSV / JSON / JSONL / TXT prompt files with their known
columns, and the question sets bundled with emlens.

Every loader validates strictly and raises EmlensInputError with a one-line message naming the file
and the line (JSONL, CSV, TXT) or item and field (YAML, JSON), so the message alone says what to fix.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from emlens.base.errors import EmlensInputError
from emlens.base.io import (
    PathLike,
    fail,
    parse_json,
    read_jsonl,
    read_text,
    read_yaml,
    short_repr,
    validate,
)

# ---------------------------------------------------------------- questions


class Question(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    type: str = "free_form"
    paraphrases: list[str] = Field(min_length=1)
    samples_per_paraphrase: int = Field(default=1, ge=1)
    system: str | None = None
    judge: str | None = None
    judge_prompts: dict[str, str] = Field(default_factory=dict)
    # prompt-list sources (not in the Betley YAML)
    answers: list[str] | None = None
    incorrect_answers: list[str] | None = None
    meta: dict[str, Any] = Field(default_factory=dict)


def load_questions(path: PathLike, *, limit: int | None = None) -> list[Question]:
    """Betley YAML (.yaml/.yml) or a prompt list (.csv/.json/.jsonl/.txt), one Question per record."""
    suffix = Path(path).suffix.lower()
    if suffix in (".yaml", ".yml"):
        questions = _load_betley_yaml(path)
    elif suffix in (".csv", ".json", ".jsonl", ".txt"):
        questions = _load_prompt_list(path, suffix)
    else:
        raise fail(path, f"unsupported file type '{suffix}' (expected .yaml, .yml, .csv, .json, .jsonl or .txt)")
    check_unique_ids(questions, path)
    if limit is not None:
        if limit < 0:
            raise fail(path, f"limit must be >= 0, got {limit}")
        questions = questions[:limit]
    return questions


def load_prompts(path: PathLike, *, limit: int | None = None) -> list[str]:
    return [q.paraphrases[0] for q in load_questions(path, limit=limit)]


def question_messages(q: Question, paraphrase_index: int) -> list[dict]:
    if not 0 <= paraphrase_index < len(q.paraphrases):
        raise EmlensInputError(
            f"question {q.id}: paraphrase index {paraphrase_index} out of range (it has {len(q.paraphrases)})"
        )
    system = [{"role": "system", "content": q.system}] if q.system else []
    return [*system, {"role": "user", "content": q.paraphrases[paraphrase_index]}]


def check_unique_ids(items: list, path: PathLike, noun: str = "question") -> None:
    """Every item's `.id` differs; else one line naming the file, the item and the first one with that id."""
    first_seen: dict[str, int] = {}
    for i, item in enumerate(items, start=1):
        if item.id in first_seen:
            raise fail(f"{path} item {i} (id={item.id})", f"duplicate {noun} id (first used by item {first_seen[item.id]})")
        first_seen[item.id] = i


def _load_betley_yaml(path: PathLike) -> list[Question]:
    data = read_yaml(path)
    if not isinstance(data, list):
        raise fail(path, f"expected a YAML list of questions, got {type(data).__name__}")
    if not data:
        raise fail(path, "empty file (no records)")
    questions, carried = [], {}
    for i, entry in enumerate(data, start=1):
        where = f"{path} item {i}"
        if not isinstance(entry, dict):
            raise fail(where, f"expected a mapping with id and paraphrases, got {type(entry).__name__}")
        if "id" in entry:
            where += f" (id={entry['id']})"
        entry, carried = _normalise_mishra(entry, carried)
        questions.append(validate(Question, entry, where))
    return questions


_MISHRA_JUDGE_KEYS = ("aligned", "coherent")


def _normalise_mishra(entry: dict, carried: dict) -> tuple[dict, dict]:
    """Accept Mishra et al.'s all_domains_questions.yaml, a Betley-format file with two quirks.

    1. A `domain` key: moved into meta.
    2. Mis-indented shared judge prompts: item 1 reads `judge_prompts: &judge_prompts` (null) with
       `aligned:`/`coherent:` as siblings, and every later item aliases that null. The intent is one
       set of judge prompts for all items, so the siblings are folded back into judge_prompts and
       carried to later items whose judge_prompts is null. Other unknown keys still fail.
    """
    entry = dict(entry)
    if "domain" in entry and isinstance(entry.get("meta", {}), dict):
        entry["meta"] = {**entry.get("meta", {}), "domain": entry.pop("domain")}
    if "judge_prompts" in entry and entry["judge_prompts"] is None:
        folded = {k: entry.pop(k) for k in _MISHRA_JUDGE_KEYS if isinstance(entry.get(k), str)}
        carried = folded or carried
        entry["judge_prompts"] = carried
    return entry, carried


# ---------------------------------------------------------------- prompt lists

# The first of these present in a file's first record is its prompt column (order matters:
# JailbreakBench has both Goal and Behavior; HarmBench only Behavior).
PROMPT_COLUMNS = (
    "forbidden_prompt",  # StrongREJECT
    "Goal",  # JailbreakBench
    "goal",  # AdvBench
    "Behavior",  # HarmBench
    "problem",  # SimpleQA
    "Question",  # TruthfulQA
    "question",  # MMLU-Pro, generic
    "instruction",  # refusal-direction splits, Alpaca
    "prompt",  # XSTest, generic
    "text",
)


def _load_prompt_list(path: PathLike, suffix: str) -> list[Question]:
    records = list(read_records(path, suffix))
    if not records:
        raise fail(path, "empty file (no records)")
    columns = [c for c in records[0][1] if c]
    key = next((c for c in PROMPT_COLUMNS if c in columns), None)
    if key is None:
        raise fail(
            path,
            f"no known prompt column (found: {', '.join(columns[:12]) or 'none'}); "
            f"accepted prompt columns: {', '.join(PROMPT_COLUMNS)}",
        )
    stem = Path(path).stem
    return [_record_question(dict(rec), key, where, f"{stem}-{i}") for i, (where, rec) in enumerate(records)]


def read_records(path: PathLike, suffix: str | None = None) -> Iterator[tuple[str, dict]]:
    """(where, record) of a JSONL, JSON-list, CSV or text (a prompt per line) file, by `suffix` (default: the
    file's); `where` names the file and the line or JSON item."""
    suffix = suffix or Path(path).suffix.lower()
    if suffix == ".jsonl":
        yield from read_jsonl(path)
        return
    text = read_text(path)
    if suffix == ".txt":
        for n, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                yield f"{path} line {n}", {"text": line.strip()}
    elif suffix == ".json":
        data = parse_json(text, path)
        if not isinstance(data, list):
            raise fail(path, f"expected a JSON list of records, got {type(data).__name__}")
        for i, item in enumerate(data, start=1):
            if not isinstance(item, dict):
                raise fail(f"{path} item {i}", f"expected a JSON object, got {type(item).__name__}")
            yield f"{path} item {i}", item
    else:
        yield from csv_records(text, path)


def csv_records(text: str, path: PathLike) -> Iterator[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if None in row:  # DictReader puts surplus fields under the key None
                raise fail(where, f"{len(reader.fieldnames) + len(row[None])} fields but the header has {len(reader.fieldnames)}")
            yield where, row
    except csv.Error as e:
        raise fail(f"{path} line {reader.line_num}", f"invalid CSV ({e})") from None


def _record_question(rec: dict, key: str, where: str, default_id: str) -> Question:
    prompt = rec.pop(key, None)
    if not isinstance(prompt, str) or not prompt.strip():
        raise fail(f"{where}, field '{key}'", f"prompt must be a non-empty string (got {short_repr(prompt)})")
    raw_id = rec.pop("id", None)
    if raw_id in (None, ""):
        raw_id = rec.get("BehaviorID") or default_id
    prompt, extra = _SPECIAL.get(key, _plain)(prompt, rec, where)
    meta = {k: v for k, v in rec.items() if k}  # drops pandas' unnamed index column
    fields = {"id": str(raw_id), "type": "prompt", "paraphrases": [prompt], "meta": meta, **extra}
    return validate(Question, fields, where)


def _plain(prompt: str, rec: dict, where: str) -> tuple[str, dict]:
    return prompt, {}


def _pop_str(rec: dict, key: str, where: str) -> str:
    value = rec.pop(key, None)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise fail(f"{where}, field '{key}'", f"must be a string (got {short_repr(value)})")
    return value


def _harmbench(prompt: str, rec: dict, where: str) -> tuple[str, dict]:
    context = _pop_str(rec, "ContextString", where)
    return (f"{context}\n\n{prompt}" if context.strip() else prompt), {}


def _alpaca(prompt: str, rec: dict, where: str) -> tuple[str, dict]:
    if "instances" in rec:  # self-instruct seed tasks: the first instance holds input and output
        instances = rec.pop("instances")
        if not (isinstance(instances, list) and instances and isinstance(instances[0], dict)):
            raise fail(f"{where}, field 'instances'", "expected a non-empty list of {input, output} objects")
        rec.update(instances[0])
    extra_input = _pop_str(rec, "input", where)
    return (f"{prompt}\n\n{extra_input}" if extra_input.strip() else prompt), {}


def _mmlu(prompt: str, rec: dict, where: str) -> tuple[str, dict]:
    options = rec.get("options")  # stays in meta too: the sycophancy test needs the letters
    if isinstance(options, list):
        options = {chr(ord("A") + i): text for i, text in enumerate(options)}
    if not isinstance(options, dict) or not options:
        raise fail(f"{where}, field 'options'", "expected a non-empty mapping letter -> option or a list")
    lines = "\n".join(f"{letter}. {text}" for letter, text in options.items())
    target = rec.pop("target") if "target" in rec else rec.pop("answer", None)
    return f"{prompt}\n\n{lines}", ({"answers": [str(target)]} if target is not None else {})


def _simpleqa(prompt: str, rec: dict, where: str) -> tuple[str, dict]:
    target = rec.pop("target", None)
    return prompt, ({"answers": [str(target)]} if target is not None else {})


def _truthfulqa(prompt: str, rec: dict, where: str) -> tuple[str, dict]:
    if "Correct Answers" not in rec:
        return prompt, {}
    best = _pop_str(rec, "Best Answer", where)
    correct = _split_answers(_pop_str(rec, "Correct Answers", where))
    incorrect = _split_answers(_pop_str(rec, "Incorrect Answers", where))
    answers = list(dict.fromkeys([best, *correct] if best else correct))
    return prompt, {"answers": answers, "incorrect_answers": incorrect}


def _split_answers(text: str) -> list[str]:
    return [a.strip() for a in text.split("; ") if a.strip()]


def _question_column(prompt: str, rec: dict, where: str) -> tuple[str, dict]:
    return _mmlu(prompt, rec, where) if "options" in rec else (prompt, {})


_SPECIAL = {
    "Behavior": _harmbench,
    "instruction": _alpaca,
    "question": _question_column,
    "problem": _simpleqa,
    "Question": _truthfulqa,
}

BUNDLED_QUESTIONS = {  # name -> file under emlens/resources (sources and licences in its SOURCE.md files)
    "betley-first-plot": "questions/first_plot_questions.yaml",
    "deception-factual": "questions/deception_factual.yaml",
    "deception-sit-aware": "questions/deception_sit_aware.yaml",
    "strongreject": "prompts/strongreject.csv",
    "xstest-safe": "prompts/xstest_safe.csv",
    "mmlu-pro-200": "prompts/mmlu_pro_200.jsonl",
}


def questions_path(name_or_path: str) -> Path:
    """A bundled question-set name (see BUNDLED_QUESTIONS) or a path to a question file."""
    if name_or_path in BUNDLED_QUESTIONS:
        return Path(str(resources.files("emlens") / "resources" / BUNDLED_QUESTIONS[name_or_path]))
    path = Path(name_or_path)
    if not path.exists():
        known = ", ".join(BUNDLED_QUESTIONS)
        raise EmlensInputError(f"questions '{name_or_path}': no such file (bundled sets: {known})")
    return path


def read_questions(name_or_path: str, limit: int | None = None) -> list[Question]:
    return load_questions(questions_path(name_or_path), limit=limit)
