"""Chat conversations: the OpenAI / Betley chat JSONL format."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from emlens.base.io import PathLike, atomic_write_text, fail, read_jsonl, validate

Role = Literal["system", "user", "assistant"]


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
    return [validate(Conversation, record, where) for where, record in read_jsonl(path)]


def save_chat_jsonl(conversations: Iterable[Conversation | dict], path: PathLike) -> None:
    convs = [validate(Conversation, c, f"{path} record {i}") for i, c in enumerate(conversations, 1)]
    if not convs:
        raise fail(path, "no conversations to write")
    body = "".join(json.dumps(c.model_dump(), ensure_ascii=False) + "\n" for c in convs)
    atomic_write_text(Path(path), body)
