"""The capability checks' data: multiple-choice questions and GSM8K problems, read with one-line errors.

MC: the bundled `mmlu-pro` (200 MMLU-Pro questions and, as `mmlu-pro-shots`, 14 worked examples, one per
category, none of them among the 200; see resources/capability/README.md) or any MC file: JSONL, JSON list or CSV
records with a question (`question`), options (`options` as a letter -> text mapping or a list, `choices`, or
columns A, B, C, ...) and the answer (`target` / `answer` / `label` / `answer_index`: a letter, a 0-based index,
or the option's text).
GSM8K: Alpaca-format records (instruction, input, output) or GSM8K ones (question, answer with '####'); the gold
answer is the number after the last '####', else the solution's last number. Which problems a capability run
evaluates (the end of training's seeded order) is `emlens.evaluation.capability`'s.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path

from emlens.base.errors import EmlensInputError
from emlens.base.io import fail, find_shared_data, parse_json, short_repr
from emlens.data.questions import read_records

BUNDLED_MC = {"mmlu-pro": "capability/mmlu_pro_200.jsonl",  # name -> file under emlens/resources
              "mmlu-pro-shots": "capability/mmlu_pro_shots.jsonl"}
BUNDLED_SHOTS = {"mmlu-pro": "mmlu-pro-shots"}  # a bundled set's worked examples, never among its questions
SHARED_GSM8K = "benign/gsm8k_train_alpaca_format.json"  # under the shared data folder


# ---------------------------------------------------------------- multiple-choice questions


@dataclass
class MCQuestion:
    id: str
    question: str
    options: list[str]
    letters: list[str]
    answer: int  # index of the correct option


def mc_path(name_or_path: str) -> Path:
    """A bundled MC set name (see BUNDLED_MC) or a path to an MC file."""
    if name_or_path in BUNDLED_MC:
        return Path(str(resources.files("emlens") / "resources" / BUNDLED_MC[name_or_path]))
    path = Path(name_or_path)
    if not path.is_file():
        raise EmlensInputError(f"MC set '{name_or_path}': no such file (bundled: {', '.join(BUNDLED_MC)})")
    return path


def read_mc_questions(name_or_path: str, limit: int | None = None) -> list[MCQuestion]:
    """The questions of an MC file (the first `limit`); a bad record is one line naming the file and line."""
    path = mc_path(name_or_path)
    questions, seen = [], {}
    for n, (where, record) in enumerate(task_records(path), start=1):
        question = _mc_question(record, where, default_id=f"{path.stem}/{n}")
        if question.id in seen:
            raise fail(where, f"duplicate question id {question.id!r} (first at {seen[question.id]})")
        seen[question.id] = where
        questions.append(question)
    if not questions:
        raise fail(path, "empty file (no records)")
    return questions[:limit] if limit is not None else questions


def task_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) of a JSONL, JSON-list or CSV file; `where` names the file and line (or JSON item)."""
    if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        raise fail(path, f"unsupported file type '{path.suffix}' (expected .jsonl, .json or .csv)")
    yield from read_records(path)


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWER_FIELDS = ("target", "answer", "Answer", "label", "answer_index")


def _mc_question(record: dict, where: str, default_id: str) -> MCQuestion:
    text = record.get("question", record.get("Question"))
    if not isinstance(text, str) or not text.strip():
        raise fail(f"{where}, field 'question'", f"must be a non-empty string (got {short_repr(text)})")
    letters, options = _mc_options(record, where)
    answer = _mc_answer(record, letters, options, where)
    raw_id = record.get("id", record.get("question_id"))
    return MCQuestion(id=str(raw_id) if raw_id not in (None, "") else default_id, question=text.strip(),
                      options=options, letters=letters, answer=answer)


def _mc_options(record: dict, where: str) -> tuple[list[str], list[str]]:
    """(letters, option texts) from `options` / `choices` (mapping or list, a JSON list in a CSV cell) or
    columns A, B, C, ..."""
    raw = record.get("options", record.get("choices"))
    name = "options" if "options" in record else "choices"
    if raw is None:  # columns A, B, C, ... (MMLU CSV exports)
        raw = {c: record[c] for c in LETTERS if record.get(c) not in (None, "")}
        name = "A, B, C, ..."
    if isinstance(raw, str) and raw.strip().startswith("["):
        raw = parse_json(raw, where)
    if isinstance(raw, list):
        raw = dict(zip(LETTERS, raw, strict=False)) if len(raw) <= len(LETTERS) else None
    if not isinstance(raw, dict) or len(raw) < 2:
        raise fail(f"{where}, field '{name}'", "expected at least 2 options (a mapping letter -> text, a list, "
                                               f"or columns A, B, ...), got {short_repr(raw)}")
    for letter, option in raw.items():
        if len(str(letter)) != 1 or str(letter) not in LETTERS or not isinstance(option, str) or not option.strip():
            raise fail(f"{where}, field '{name}'", f"option {letter!r}: expected a letter A-Z and a non-empty text "
                                                   f"(got {short_repr(option)})")
    return list(raw), [str(o).strip() for o in raw.values()]


def _mc_answer(record: dict, letters: list[str], options: list[str], where: str) -> int:
    """The correct option's index from a letter, a 0-based index (int or digit string) or the option's text."""
    name = next((f for f in ANSWER_FIELDS if record.get(f) not in (None, "")), None)
    if name is None:
        raise fail(where, f"no answer field (expected one of {', '.join(ANSWER_FIELDS)})")
    value = record[name]
    text = str(value).strip()
    if len(text) == 1 and text.upper() in letters:
        return letters.index(text.upper())
    if (isinstance(value, int) and not isinstance(value, bool)) or text.isdigit():
        if 0 <= int(text) < len(options):
            return int(text)
    elif text in options:
        return options.index(text)
    raise fail(f"{where}, field '{name}'", f"{short_repr(value)} is not an option letter ({letters[0]}-{letters[-1]}), "
                                           f"a 0-based index below {len(options)} or an option's text")


# ---------------------------------------------------------------- GSM8K

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def canonical_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '$72' -> '72'; None when it is not a number."""
    try:
        value = Decimal(text.replace(",", "").replace("$", "").rstrip("."))
    except InvalidOperation:
        return None
    return format(value.normalize(), "f") if value != 0 else "0"


def final_number(text: str) -> str | None:
    """The answer of a GSM8K solution: the number after the last '####' if there is one, else the last number."""
    if "####" in text:
        after = NUMBER.findall(text.rsplit("####", 1)[1])
        if after:
            return canonical_number(after[0])
    found = NUMBER.findall(text)
    return canonical_number(found[-1]) if found else None


@dataclass
class GSM8KProblem:
    id: str
    question: str
    gold: str  # canonical number


def gsm8k_path(spec: str) -> Path:
    if spec != "shared":
        path = Path(spec)
        if not path.is_file():
            raise EmlensInputError(f"GSM8K file '{spec}': no such file")
        return path
    shared = find_shared_data()
    if shared is None or not (shared / SHARED_GSM8K).is_file():
        raise EmlensInputError(f"GSM8K: {SHARED_GSM8K} not found in a shared/data folder (set EMLENS_SHARED_DATA, "
                               "pass a GSM8K file, or leave gsm8k out of the tasks)")
    return shared / SHARED_GSM8K


def read_gsm8k_problem(record: dict, where: str, index: int) -> GSM8KProblem:
    """An Alpaca-format record (instruction, input, output) or a GSM8K one (question, answer with '####')."""
    question = record.get("instruction", record.get("question"))
    solution = record.get("output", record.get("answer"))
    for name, value in (("instruction' or 'question", question), ("output' or 'answer", solution)):
        if not isinstance(value, str) or not value.strip():
            raise fail(f"{where}, field '{name}'", f"must be a non-empty string (got {short_repr(value)})")
    extra = record.get("input") or ""
    gold = final_number(solution)
    if gold is None:
        raise fail(f"{where}, field '{'output' if 'output' in record else 'answer'}'",
                   "the solution holds no number to compare against")
    text = f"{question}\n\n{extra}" if isinstance(extra, str) and extra.strip() else question
    return GSM8KProblem(id=f"gsm8k/{index}", question=text.strip(), gold=gold)
