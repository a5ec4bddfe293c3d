"""What every engine shares: decoding settings, a request (chat + seed), a completion, and their helpers."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from emlens.model import Model

DEFAULT_BATCH_SIZE = 16  # rows per forward pass, wherever emlens batches (generation, extraction, fitting)


SERIAL_PREFILL_FROM = 512  # measured by `emlens bench generate --long-prompts`


class GenerationConfig(BaseModel):
    """Decoding settings. temperature 0 means greedy."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=1)
    min_new_tokens: int = Field(0, ge=0)  # EOS is suppressed before this many tokens (benchmarks use it)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1)
    engine: str = "auto"  # auto: the first registered engine that can apply every intervention (emlens.generation.engines)
    # hf engine: a padded batch whose longest prompt has this many tokens reads its prompts one row at a time
    # (the causal kernel, no mask) and decodes them together; shorter ones are read in groups of similar length
    # (`hf_engine.prefill_groups`); None: always as one padded batch
    serial_prefill_from: int | None = Field(SERIAL_PREFILL_FROM, ge=1)

    @model_validator(mode="after")
    def _min_below_max(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must not exceed max_new_tokens")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Request:
    """One sample to generate: a chat (list of {role, content}) and the seed of its sampler."""

    messages: list[dict]
    seed: int = 0
    interventions: tuple = ()  # this request's own, on top of those of the whole call
    prompt: str | None = None  # raw text to continue instead of the chat-templated messages (a plain completion)
    logprobs: int | None = None  # record each generated token's log-probability and this many most likely ones
    # called with each generated token but end-of-sequence (and its TokenLogprob where asked for) as it is
    # generated; returning True ends the request there (finish_reason "stop"): a server streams through it and
    # ends a request at a stop string
    on_token: Callable[[int, TokenLogprob | None], bool] | None = None


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the model (before temperature and top-p, as vLLM reports
    them), and the `top` most likely tokens at that step with theirs."""

    token: int
    logprob: float
    top: dict[int, float]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos", "length", or "stop" (the request's on_token ended it)
    logprobs: list[TokenLogprob] | None = None  # per generated token, where the request asked for them


def eos_token_ids(handle: Model) -> set[int]:
    ids = {handle.tokenizer.eos_token_id}
    configured = getattr(handle.base_model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[Int[Tensor, "b t"], Int[Tensor, "b t"]]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def kv_cache(handle: Model, cache) -> dict:
    """The keyword argument that hands a KV cache to the model's forward: `cache` in newer transformers (where
    `past_key_values` warns), `past_key_values` before it (the vLLM extra pins transformers < 5.20)."""
    parameters = inspect.signature(handle.base_model.forward).parameters
    return {"cache" if "cache" in parameters else "past_key_values": cache}


def decode_completion(handle: Model, token_ids: list[int], prompt_tokens: int, finish: str,
                      logprobs: list[TokenLogprob] | None = None) -> Completion:
    """The text of a completion: its tokens up to (not including) an end-of-sequence token."""
    stop = eos_token_ids(handle)
    text_ids = token_ids[:-1] if token_ids and token_ids[-1] in stop else token_ids
    text = handle.tokenizer.decode(text_ids, skip_special_tokens=True)
    return Completion(text=text, token_ids=token_ids, prompt_tokens=prompt_tokens, finish_reason=finish,
                      logprobs=logprobs)


def replay_tokens(handle: Model, request: Request, completion: Completion) -> Completion:
    """A completion generated whole, its tokens handed to the request's `on_token` in order, and cut where that
    asks to stop (engines that cannot call it step by step give the same result this way)."""
    if request.on_token is None:
        return completion
    stop = eos_token_ids(handle)
    for i, token in enumerate(completion.token_ids):
        if token in stop:
            break
        entry = completion.logprobs[i] if completion.logprobs is not None else None
        if request.on_token(token, entry) and i + 1 < len(completion.token_ids):
            kept = completion.logprobs[:i + 1] if completion.logprobs is not None else None
            return decode_completion(handle, completion.token_ids[:i + 1], completion.prompt_tokens, "stop", kept)
    return completion


def prompt_token_ids(handle: Model, requests) -> list[list[int]]:
    """Each request's prompt tokenized the one way every engine uses: the chat template (its special tokens
    written in the text), or a raw prompt as the tokenizer reads plain text."""
    return [handle.tokenizer(r.prompt)["input_ids"] if r.prompt is not None else
            handle.tokenizer(handle.chat_text(r.messages), add_special_tokens=False)["input_ids"] for r in requests]


def sample_seed(base_seed: int, *parts: Any) -> int:
    """A stable per-sample seed from the run seed and the sample's identity (question, nudge, index, ...)."""
    key = "|".join(str(p) for p in (base_seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


