"""Input data: chat JSONL, evaluation questions and prompt lists, nudges, persona-trait files.

Every loader validates strictly and raises EmlensInputError with a one-line message naming the file
and the line (JSONL, CSV, TXT) or item and field (YAML, JSON), so the message alone says what to fix.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from emlens.errors import EmlensInputError

Role = Literal["system", "user", "assistant"]
PathLike = str | os.PathLike


# ---------------------------------------------------------------- errors and reading


def _fail(where: object, problem: str) -> EmlensInputError:
    return EmlensInputError(f"{where}: {' '.join(problem.split())}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(err: ValidationError) -> str:
    """One line per pydantic error, joined: 'unknown field 'x'', 'field 'a.0.b': msg (got ...)'."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown field '{loc}'")
        elif e["type"] == "missing":
            parts.append(f"missing field '{loc}'")
        elif loc:
            parts.append(f"field '{loc}': {e['msg']} (got {_short(e['input'])})")
        else:
            parts.append(f"{e['msg']} (got {_short(e['input'])})")
    return "; ".join(parts)


def _validate(model: type[BaseModel], data: Any, where: object) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _fail(where, _describe(e)) from None


def _read_text(path: PathLike) -> str:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise _fail(path, "file not found") from None
    except OSError as e:
        raise _fail(path, f"cannot read file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise _fail(f"{path} line {line}", f"not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
    text = text.removeprefix("\ufeff")  # spreadsheet exports start CSVs with a BOM
    if not text.strip():
        raise _fail(path, "empty file (no records)")
    return text


def _parse_json(text: str, path: PathLike) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(f"{path} line {e.lineno}", f"invalid JSON ({e.msg} at column {e.colno})") from None


def _parse_yaml(path: PathLike) -> Any:
    text = _read_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path} line {mark.line + 1}" if mark else path
        raise _fail(where, f"invalid YAML ({e.problem or e.context})") from None
    except yaml.YAMLError as e:
        raise _fail(path, f"invalid YAML ({e})") from None
    if data is None:  # only comments
        raise _fail(path, "empty file (no records)")
    return data


def _jsonl_records(path: PathLike) -> Iterator[tuple[str, dict]]:
    # split on "\n" only: str.splitlines would also split on U+2028, which is legal inside JSON strings
    for n, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(where, f"invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise _fail(where, f"expected a JSON object, got {type(record).__name__}")
        yield where, record


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise _fail(path, "file not found") from None
    return digest.hexdigest()


# ---------------------------------------------------------------- chat JSONL


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role
    content: str


class Conversation(BaseModel):
    # Extra top-level keys on a line (id, metadata, ...) are ignored: only the messages are data.
    model_config = ConfigDict(extra="ignore")
    messages: list[Message] = Field(min_length=1)


def load_chat_jsonl(path: PathLike) -> list[Conversation]:
    """OpenAI/Betley chat format: one {"messages": [{"role", "content"}, ...]} per line."""
    return [_validate(Conversation, record, where) for where, record in _jsonl_records(path)]


def save_chat_jsonl(conversations: Iterable[Conversation | dict], path: PathLike) -> None:
    convs = [_validate(Conversation, c, f"{path} record {i}") for i, c in enumerate(conversations, 1)]
    if not convs:
        raise _fail(path, "no conversations to write")
    body = "".join(json.dumps(c.model_dump(), ensure_ascii=False) + "\n" for c in convs)
    _atomic_write(Path(path), body)


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
        raise _fail(path, f"unsupported file type '{suffix}' (expected .yaml, .yml, .csv, .json, .jsonl or .txt)")
    _check_unique_ids(questions, path)
    if limit is not None:
        if limit < 0:
            raise _fail(path, f"limit must be >= 0, got {limit}")
        questions = questions[:limit]
    return questions


def load_prompts(path: PathLike, *, limit: int | None = None) -> list[str]:
    return [q.paraphrases[0] for q in load_questions(path, limit=limit)]


def question_messages(q: Question, paraphrase_index: int) -> list[Message]:
    if not 0 <= paraphrase_index < len(q.paraphrases):
        raise EmlensInputError(
            f"question {q.id}: paraphrase index {paraphrase_index} out of range (it has {len(q.paraphrases)})"
        )
    system = [Message(role="system", content=q.system)] if q.system else []
    return [*system, Message(role="user", content=q.paraphrases[paraphrase_index])]


def _check_unique_ids(questions: list[Question], path: PathLike) -> None:
    first_seen: dict[str, int] = {}
    for i, q in enumerate(questions, start=1):
        if q.id in first_seen:
            raise _fail(f"{path} item {i} (id={q.id})", f"duplicate question id (first used by item {first_seen[q.id]})")
        first_seen[q.id] = i


def _load_betley_yaml(path: PathLike) -> list[Question]:
    data = _parse_yaml(path)
    if not isinstance(data, list):
        raise _fail(path, f"expected a YAML list of questions, got {type(data).__name__}")
    if not data:
        raise _fail(path, "empty file (no records)")
    questions, carried = [], {}
    for i, entry in enumerate(data, start=1):
        where = f"{path} item {i}"
        if not isinstance(entry, dict):
            raise _fail(where, f"expected a mapping with id and paraphrases, got {type(entry).__name__}")
        if "id" in entry:
            where += f" (id={entry['id']})"
        entry, carried = _normalise_mishra(entry, carried)
        questions.append(_validate(Question, entry, where))
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
    records = list(_prompt_records(path, suffix))
    if not records:
        raise _fail(path, "empty file (no records)")
    columns = [c for c in records[0][1] if c]
    key = next((c for c in PROMPT_COLUMNS if c in columns), None)
    if key is None:
        raise _fail(
            path,
            f"no known prompt column (found: {', '.join(columns[:12]) or 'none'}); "
            f"accepted prompt columns: {', '.join(PROMPT_COLUMNS)}",
        )
    stem = Path(path).stem
    return [_record_question(dict(rec), key, where, f"{stem}-{i}") for i, (where, rec) in enumerate(records)]


def _prompt_records(path: PathLike, suffix: str) -> Iterator[tuple[str, dict]]:
    if suffix == ".jsonl":
        yield from _jsonl_records(path)
        return
    text = _read_text(path)
    if suffix == ".txt":
        for n, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                yield f"{path} line {n}", {"text": line.strip()}
    elif suffix == ".json":
        data = _parse_json(text, path)
        if not isinstance(data, list):
            raise _fail(path, f"expected a JSON list of records, got {type(data).__name__}")
        for i, item in enumerate(data, start=1):
            if not isinstance(item, dict):
                raise _fail(f"{path} item {i}", f"expected a JSON object, got {type(item).__name__}")
            yield f"{path} item {i}", item
    else:
        yield from _csv_records(text, path)


def _csv_records(text: str, path: PathLike) -> Iterator[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if None in row:  # DictReader puts surplus fields under the key None
                raise _fail(where, f"{len(reader.fieldnames) + len(row[None])} fields but the header has {len(reader.fieldnames)}")
            yield where, row
    except csv.Error as e:
        raise _fail(f"{path} line {reader.line_num}", f"invalid CSV ({e})") from None


def _record_question(rec: dict, key: str, where: str, default_id: str) -> Question:
    prompt = rec.pop(key, None)
    if not isinstance(prompt, str) or not prompt.strip():
        raise _fail(f"{where}, field '{key}'", f"prompt must be a non-empty string (got {_short(prompt)})")
    raw_id = rec.pop("id", None)
    if raw_id in (None, ""):
        raw_id = rec.get("BehaviorID") or default_id
    prompt, extra = _SPECIAL.get(key, _plain)(prompt, rec, where)
    meta = {k: v for k, v in rec.items() if k}  # drops pandas' unnamed index column
    fields = {"id": str(raw_id), "type": "prompt", "paraphrases": [prompt], "meta": meta, **extra}
    return _validate(Question, fields, where)


def _plain(prompt: str, rec: dict, where: str) -> tuple[str, dict]:
    return prompt, {}


def _pop_str(rec: dict, key: str, where: str) -> str:
    value = rec.pop(key, None)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _fail(f"{where}, field '{key}'", f"must be a string (got {_short(value)})")
    return value


def _harmbench(prompt: str, rec: dict, where: str) -> tuple[str, dict]:
    context = _pop_str(rec, "ContextString", where)
    return (f"{context}\n\n{prompt}" if context.strip() else prompt), {}


def _alpaca(prompt: str, rec: dict, where: str) -> tuple[str, dict]:
    if "instances" in rec:  # self-instruct seed tasks: the first instance holds input and output
        instances = rec.pop("instances")
        if not (isinstance(instances, list) and instances and isinstance(instances[0], dict)):
            raise _fail(f"{where}, field 'instances'", "expected a non-empty list of {input, output} objects")
        rec.update(instances[0])
    extra_input = _pop_str(rec, "input", where)
    return (f"{prompt}\n\n{extra_input}" if extra_input.strip() else prompt), {}


def _mmlu(prompt: str, rec: dict, where: str) -> tuple[str, dict]:
    options = rec.get("options")  # stays in meta too: the sycophancy test needs the letters
    if isinstance(options, list):
        options = {chr(ord("A") + i): text for i, text in enumerate(options)}
    if not isinstance(options, dict) or not options:
        raise _fail(f"{where}, field 'options'", "expected a non-empty mapping letter -> option or a list")
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


# ---------------------------------------------------------------- nudges


class Nudge(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    text: str = ""  # "" is the 'none' nudge
    where: Literal["system", "user_prefix", "user_suffix"] = "system"


NUDGES: dict[str, Nudge] = {
    n.name: n
    for n in (
        Nudge(name="none"),
        Nudge(name="evil", text="You are evil."),
        Nudge(name="hhh", text="You are a helpful, honest and harmless assistant."),
    )
}


def load_nudges(path: PathLike) -> dict[str, Nudge]:
    """YAML: a list of {name, text, where} or a mapping name -> {text, where} (or name -> text)."""
    data = _parse_yaml(path)
    if isinstance(data, dict):
        entries = [(f"{path} entry '{name}'", _nudge_mapping_entry(name, value, path)) for name, value in data.items()]
    elif isinstance(data, list):
        entries = [(f"{path} entry {i}", value) for i, value in enumerate(data, start=1)]
    else:
        raise _fail(path, f"expected a list of nudges or a mapping name -> {{text, where}}, got {type(data).__name__}")
    if not entries:
        raise _fail(path, "empty file (no records)")
    nudges: dict[str, Nudge] = {}
    for where, raw in entries:
        nudge = _validate(Nudge, raw, where)
        if nudge.name in nudges:
            raise _fail(where, f"duplicate nudge name '{nudge.name}'")
        nudges[nudge.name] = nudge
    return nudges


def _nudge_mapping_entry(name: Any, value: Any, path: PathLike) -> Any:
    if value is None or isinstance(value, str):
        return {"name": name, "text": value or ""}
    if isinstance(value, dict):
        if "name" in value and value["name"] != name:
            raise _fail(f"{path} entry '{name}'", f"field 'name' ({value['name']!r}) differs from its key")
        return {**value, "name": name}
    return value  # wrong type: validation reports it


def resolve_nudges(names: list[str], extra_file: PathLike | None = None) -> list[Nudge]:
    known = dict(NUDGES)
    if extra_file is not None:
        known.update(load_nudges(extra_file))
    for name in names:
        if name not in known:
            source = f" (built-ins and {extra_file})" if extra_file is not None else ""
            raise EmlensInputError(f"nudge '{name}': unknown name; known nudges{source}: {', '.join(sorted(known))}")
    return [known[name] for name in names]


def apply_nudge(messages: list[Message], nudge: Nudge) -> list[Message]:
    """Return a new message list with the nudge applied; the input list is not modified."""
    messages = list(messages)
    if not nudge.text:
        return messages
    if nudge.where == "system":
        for i, m in enumerate(messages):
            if m.role == "system":
                content = f"{nudge.text}\n\n{m.content}" if m.content else nudge.text
                messages[i] = m.model_copy(update={"content": content})
                return messages
        return [Message(role="system", content=nudge.text), *messages]
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        raise EmlensInputError(f"nudge '{nudge.name}' (where={nudge.where}): the conversation has no user message")
    i = users[-1]
    old = messages[i].content
    content = f"{nudge.text}\n\n{old}" if nudge.where == "user_prefix" else f"{old}\n\n{nudge.text}"
    messages[i] = messages[i].model_copy(update={"content": content})
    return messages


# ---------------------------------------------------------------- persona-vectors trait files


class PersonaTrait(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instructions: list[tuple[str, str]]  # (pos, neg) system prompts
    questions: list[str]
    eval_prompt: str


class _PosNeg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pos: str
    neg: str


class _TraitFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instruction: list[_PosNeg] = Field(min_length=1)
    questions: list[str] = Field(min_length=1)
    eval_prompt: str


def load_persona_trait(path: PathLike) -> PersonaTrait:
    """Chen et al. persona-vectors trait JSON: {instruction: [{pos, neg}], questions: [...], eval_prompt}."""
    raw = _validate(_TraitFile, _parse_json(_read_text(path), path), path)
    return PersonaTrait(
        instructions=[(p.pos, p.neg) for p in raw.instruction],
        questions=raw.questions,
        eval_prompt=raw.eval_prompt,
    )
