"""Nudges: system prompts or user prefixes / suffixes laid over a conversation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from emlens.base.errors import EmlensInputError
from emlens.base.io import PathLike, fail, read_yaml, validate

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
    data = read_yaml(path)
    if isinstance(data, dict):
        entries = [(f"{path} entry '{name}'", _nudge_mapping_entry(name, value, path)) for name, value in data.items()]
    elif isinstance(data, list):
        entries = [(f"{path} entry {i}", value) for i, value in enumerate(data, start=1)]
    else:
        raise fail(path, f"expected a list of nudges or a mapping name -> {{text, where}}, got {type(data).__name__}")
    if not entries:
        raise fail(path, "empty file (no records)")
    nudges: dict[str, Nudge] = {}
    for where, raw in entries:
        nudge = validate(Nudge, raw, where)
        if nudge.name in nudges:
            raise fail(where, f"duplicate nudge name '{nudge.name}'")
        nudges[nudge.name] = nudge
    return nudges


def _nudge_mapping_entry(name: Any, value: Any, path: PathLike) -> Any:
    if value is None or isinstance(value, str):
        return {"name": name, "text": value or ""}
    if isinstance(value, dict):
        if "name" in value and value["name"] != name:
            raise fail(f"{path} entry '{name}'", f"field 'name' ({value['name']!r}) differs from its key")
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


def apply_nudge(messages: list[dict], nudge: Nudge) -> list[dict]:
    """A new chat (list of {role, content}) with the nudge applied; the input is not modified."""
    messages = [dict(m) for m in messages]
    if not nudge.text:
        return messages
    if nudge.where == "system":
        for m in messages:
            if m["role"] == "system":
                m["content"] = f"{nudge.text}\n\n{m['content']}" if m["content"] else nudge.text
                return messages
        return [{"role": "system", "content": nudge.text}, *messages]
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise EmlensInputError(f"nudge '{nudge.name}' (where={nudge.where}): the conversation has no user message")
    old = users[-1]["content"]
    users[-1]["content"] = f"{nudge.text}\n\n{old}" if nudge.where == "user_prefix" else f"{old}\n\n{nudge.text}"
    return messages
