"""`emlens serve`'s settings: where it listens and the limits every request is held to."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from emlens.base.config import Config

API_KEY_ENV = "EMLENS_API_KEY"  # when set, every request needs `Authorization: Bearer <key>` (never logged)


class ServeConfig(Config):
    host: str = Field("127.0.0.1", description="address to bind (loopback unless told otherwise)")
    port: int = Field(8000, ge=0, le=65535, description="port (0: any free port)")
    engine: Literal["hf", "vllm"] = Field("hf", description="who generates: hf (the reference decode loop) or vllm")
    max_tokens: int = Field(2048, ge=1, description="the most tokens one completion may ask for")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens of a request that names none (capped by "
                                                           "max_tokens and the model's context)")
    max_n: int = Field(8, ge=1, description="the most completions one request may ask for")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="the largest request body accepted")
    # the hf engine batches requests that arrive together; vLLM adds them to its running batch as they come
    batch_window_ms: float = Field(10.0, ge=0, description="hf engine: how long the first request of a batch waits "
                                                           "for others")
    max_batch: int = Field(64, ge=1, description="hf engine: the most requests one engine call holds")
