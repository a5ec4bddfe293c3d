"""The texts whose token windows explain and score SAE latents, read at run time from files (never copied into
the repository): judged responses (.csv: question, answer), Alpaca-style instructions (.json: instruction,
input, output), chat datasets (.jsonl: messages) or plain lines (.txt). Each becomes a chat prompt with the
response that followed it, read through the model as `sae diff` reads its prompts.

Without files: the Betley insecure-code model's judged answers and Alpaca instructions from the shared data
(`EMLENS_SHARED_DATA`, or a `shared/data` folder above the working folder).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from emlens.base.io import fail, find_shared_data, read_json, read_jsonl
from emlens.capture.items import ExtractItem
from emlens.data.order import seeded_order

DEFAULT_SOURCES = ("judged/responses_Qwen-Coder-Insecure.csv", "benign/alpaca_instructions_refusal_direction.json")
SUFFIXES = (".csv", ".json", ".jsonl", ".txt")


def default_sources() -> list[Path]:
    """The shared-data files read when none are named; one line when the shared data cannot be found."""
    root = find_shared_data()
    if root is None or not root.is_dir():
        raise fail("texts", "no --texts given and no shared data found (set EMLENS_SHARED_DATA to its folder)")
    return [root / name for name in DEFAULT_SOURCES]


def read_texts(paths: Sequence[str | Path], limit: int | None = None, seed: int = 0) -> list[ExtractItem]:
    """Up to `limit` items from each file, a seeded draw (a file's first rows are often one topic)."""
    items = []
    for path in map(Path, paths):
        found = read_file(path)
        if not found:
            raise fail(path, "holds no texts")
        order = seeded_order(len(found), seed, f"sae-explain:{path.name}")[:limit]
        items += [found[i] for i in order]
    return items


def read_file(path: Path) -> list[ExtractItem]:
    if path.suffix not in SUFFIXES:
        raise fail(path, f"texts must be one of {', '.join(SUFFIXES)} (got '{path.suffix or 'no suffix'}')")
    if not path.is_file():
        raise fail(path, "no such file")
    return {".csv": csv_items, ".json": json_items, ".jsonl": jsonl_items, ".txt": txt_items}[path.suffix](path)


def csv_items(path: Path) -> list[ExtractItem]:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if {"question", "answer"} <= set(table.columns):
        return [user_item(q, a) for q, a in zip(table.question, table.answer, strict=True) if q.strip()]
    if "text" in table.columns:
        return [user_item(t) for t in table.text if t.strip()]
    raise fail(path, f"expected columns question and answer, or text (found {', '.join(table.columns)})")


def json_items(path: Path) -> list[ExtractItem]:
    records = read_json(path)
    if not isinstance(records, list):
        raise fail(path, f"expected a JSON list of records, got {type(records).__name__}")
    return [record_item(record, f"{path} item {n}") for n, record in enumerate(records, 1)]


def record_item(record, where: str) -> ExtractItem:
    if isinstance(record, str):
        return user_item(record)
    if not isinstance(record, dict) or not isinstance(record.get("instruction", record.get("text")), str):
        raise fail(where, "expected a string or an object with an 'instruction' or 'text' string")
    prompt = "\n\n".join(filter(None, [record.get("instruction", record.get("text")), record.get("input")]))
    return user_item(prompt, record.get("output") or record.get("response"))


def jsonl_items(path: Path) -> list[ExtractItem]:
    items = []
    for where, record in read_jsonl(path):
        messages = record.get("messages")
        if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
            last = messages[-1]
            if last.get("role") == "assistant" and len(messages) > 1:
                items.append(ExtractItem(messages[:-1], response=str(last.get("content") or "")))
            else:
                items.append(ExtractItem(messages))
        else:
            items.append(record_item(record, where))
    return items


def txt_items(path: Path) -> list[ExtractItem]:
    return [user_item(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def user_item(prompt: str, response: str | None = None) -> ExtractItem:
    return ExtractItem([{"role": "user", "content": prompt}], response=response or None)
