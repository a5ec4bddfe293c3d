"""The OpenAI-compatible request bodies `emlens serve` accepts, with emlens's steering extension, and its errors.

The extension rides in the body's `emlens` field (`extra_body={"emlens": {...}}` with the OpenAI Python client):

    {"emlens": {"steer": [{"op": "add", "direction": "evil", "scale": 4.0}]}}

Each op names exactly one registered direction, a latent of a registered SAE, or an inline `vector` (with its
`layer`). `scale` is in the units of `emlens steer` (times the direction's natural norm at that layer; a latent's
typical firing), so the same number gives the same output. Unknown fields are errors, not silently ignored:
a typo in a steering request must never return unsteered text as if it were steered.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ServeError(Exception):
    """A request the server refuses: an OpenAI-style error body with the HTTP status and the field named."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class SteerOp(BaseModel):
    """One intervention of a request: add, ablate or ablate_then_add one registered direction (or SAE latent)."""

    model_config = ConfigDict(extra="forbid")

    op: Literal["add", "ablate", "ablate_then_add"]
    direction: str | None = None  # a direction registered at start (--direction NAME=PATH)
    latent: int | None = Field(None, ge=0)  # a latent of a registered SAE (--sae NAME=PATH)
    sae: str | None = None  # which registered SAE the latent is of (default: the only one)
    vector: list[float] | None = None  # an inline vector of the model's width, written at `layer`
    scale: float = Field(1.0, allow_inf_nan=False)
    layer: int | None = Field(None, ge=0)  # default: the direction's best layer (a latent: its SAE's layer)
    positions: Literal["all", "prompt", "response"] = "all"

    @model_validator(mode="after")
    def _one_source(self):
        given = [name for name in ("direction", "latent", "vector") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"name exactly one of direction, latent, vector (given: {', '.join(given) or 'none'})")
        if self.vector is not None and self.layer is None:
            raise ValueError("an inline vector needs its layer")
        if self.vector is not None and not all(math.isfinite(x) for x in self.vector):
            raise ValueError("the inline vector has a non-finite entry")
        return self


class Extension(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steer: list[SteerOp] = Field(default_factory=list, max_length=16)


class _Sampling(BaseModel):
    """Fields every generation request shares. Fields the OpenAI API defines but emlens does not implement
    (penalties, tools, response_format, ...) are refused by name rather than ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)  # vLLM's extra parameter: no end-of-sequence before this many tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    frequency_penalty: float = 0.0  # accepted only at their neutral values (clients send them by default)
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    emlens: Extension = Field(default_factory=Extension)

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _neutral_penalty(cls, value):
        if value != 0:
            raise ValueError("penalties are not supported (only 0)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... are carried, not read

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_k_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat(self) -> list[dict]:
        # the developer role is the system role of newer OpenAI models; chat templates know only `system`
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value):
        if value:
            raise ValueError("echo is not supported")
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def top_k_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def error_param(location: tuple) -> str | None:
    """The dotted field name of a pydantic error location (`emlens.steer.0.scale`), without the body prefix."""
    parts = [str(p) for p in location if p != "body"]
    return ".".join(parts) or None
