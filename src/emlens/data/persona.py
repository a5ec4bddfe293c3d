"""Chen et al. persona-vectors trait files."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from emlens.base.io import PathLike, parse_json, read_text, validate

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
    raw = validate(_TraitFile, parse_json(read_text(path), path), path)
    return PersonaTrait(
        instructions=[(p.pos, p.neg) for p in raw.instruction],
        questions=raw.questions,
        eval_prompt=raw.eval_prompt,
    )
