"""One batched generation engine for eval and steering.

Steering is evaluation with interventions attached: `generate(..., interventions=[...])` enters each
intervention's context manager around the whole decode loop, and before every forward pass the engine
publishes, in a `ForwardContext`, which of the current input positions are prompt tokens and which are
response tokens (padding is neither), so an intervention never touches padding.

Each sample carries its own seed and torch.Generator, so a sample's text does not depend on which other
samples share its batch: a resumed run reproduces exactly the samples an interrupted one would have made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor
from tqdm import tqdm

from emlens.generation.context import Intervention, describe, intervene
from emlens.model import Model

DEFAULT_BATCH_SIZE = 16  # rows per forward pass, wherever emlens batches (generation, extraction, fitting)


class GenerationConfig(BaseModel):
    """Decoding settings. temperature 0 means greedy."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=1)
    min_new_tokens: int = Field(0, ge=0)  # EOS is suppressed before this many tokens (benchmarks use it)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1)

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


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" or "length"


def generate(handle: Model, requests: Sequence[Request], config: GenerationConfig | None = None,
             interventions: Iterable[Intervention] = (), progress: bool = True,
             on_batch: Callable[[list[int], list[Completion]], None] | None = None) -> list[Completion]:
    """Generate one completion per request, batching requests of similar prompt length.

    `on_batch(indices, completions)` is called after every batch so callers can persist finished samples.
    """
    config = config or GenerationConfig()
    tokenizer = handle.tokenizer
    prompt_ids = [tokenizer(handle.chat_text(r.messages), add_special_tokens=False)["input_ids"] for r in requests]
    order = sorted(range(len(requests)), key=lambda i: len(prompt_ids[i]))  # length grouping: little padding
    results: list[Completion | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="generate", unit="sample", disable=not progress)
    with intervene(handle, interventions):
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            completions = _generate_batch(handle, [prompt_ids[i] for i in batch],
                                          [requests[i].seed for i in batch], config)
            for i, completion in zip(batch, completions, strict=False):
                results[i] = completion
            if on_batch is not None:
                on_batch(batch, completions)
            bar.update(len(batch))
    bar.close()
    return results  # type: ignore[return-value]


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


@torch.inference_mode()
def _generate_batch(handle: Model, prompts: list[list[int]], seeds: list[int],
                    config: GenerationConfig) -> list[Completion]:
    from transformers import DynamicCache

    model, device = handle.model, handle.device
    eos = torch.tensor(sorted(eos_token_ids(handle)), device=device)
    input_ids, attention = left_pad(prompts, handle.tokenizer.pad_token_id, device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    cache = DynamicCache(config=handle.base_model.config)

    live = list(range(len(prompts)))  # original row of each row still decoding
    tokens: list[list[int]] = [[] for _ in prompts]
    finish = ["length"] * len(prompts)
    prompt_mask, response_mask = attention.bool(), torch.zeros_like(attention, dtype=torch.bool)
    for step in range(-1, config.max_new_tokens - 1):
        with describe(handle, prompt_mask, response_mask, step):
            logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                           cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :].float()
        if step + 1 < config.min_new_tokens:
            logits[:, eos] = float("-inf")
        next_ids = _pick_tokens(logits, config, [generators[r] for r in live])
        done = torch.isin(next_ids, eos)
        for row, (token, is_done) in enumerate(zip(next_ids.tolist(), done.tolist(), strict=False)):
            tokens[live[row]].append(token)
            if is_done:
                finish[live[row]] = "eos"
        if step + 2 >= config.max_new_tokens or bool(done.all()):
            break
        keep = (~done).nonzero().squeeze(-1)
        if len(keep) < len(live):  # drop finished rows so they cost nothing more
            cache.batch_select_indices(keep)
            attention, positions, next_ids = attention[keep], positions[keep], next_ids[keep]
            live = [live[i] for i in keep.tolist()]
        input_ids = next_ids[:, None]
        attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=1)
        positions = positions[:, -1:] + 1
        prompt_mask = torch.zeros((len(live), 1), dtype=torch.bool, device=device)
        response_mask = torch.ones((len(live), 1), dtype=torch.bool, device=device)
    return [_completion(handle, tokens[i], len(prompts[i]), finish[i], eos) for i in range(len(prompts))]


def _completion(handle: Model, token_ids: list[int], prompt_tokens: int, finish: str, eos: Tensor) -> Completion:
    stop = set(eos.tolist())
    text_ids = token_ids[:-1] if token_ids and token_ids[-1] in stop else token_ids
    text = handle.tokenizer.decode(text_ids, skip_special_tokens=True)
    return Completion(text=text, token_ids=token_ids, prompt_tokens=prompt_tokens, finish_reason=finish)


def _pick_tokens(logits: Tensor, config: GenerationConfig, generators: list[torch.Generator]) -> Tensor:
    if config.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits / config.temperature, dim=-1)
    if config.top_p < 1.0:
        probs = _nucleus(probs, config.top_p)
    # One generator per row: a row's draw never depends on the other rows of the batch.
    return torch.cat([torch.multinomial(probs[row], 1, generator=g) for row, g in enumerate(generators)])


def _nucleus(probs: Tensor, top_p: float) -> Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set whose mass reaches top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def sample_seed(base_seed: int, *parts: Any) -> int:
    """A stable per-sample seed from the run seed and the sample's identity (question, nudge, index, ...)."""
    import hashlib

    key = "|".join(str(p) for p in (base_seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def generate_text(model: Model, prompts: str | list, config: GenerationConfig | None = None, seed: int = 0,
                  progress: bool = False, interventions: Iterable[Intervention] = (), **settings) -> str | list[str]:
    """Text in, text out: `em.generate(model, "Hi")` -> str; a list of prompts (strings or chats) -> list[str].

    `settings` are GenerationConfig fields (max_new_tokens, temperature: 0 = greedy, top_p, batch_size); sample
    i is drawn with seed `seed + i`, so the output does not depend on what else is in the batch.
    """
    single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], dict))
    chats = [prompts] if single else list(prompts)
    chats = [[{"role": "user", "content": c}] if isinstance(c, str) else c for c in chats]
    config = GenerationConfig(**{**(config.model_dump() if config else {}), **settings})
    completions = generate(model, [Request(chat, seed=seed + i) for i, chat in enumerate(chats)], config,
                           interventions=interventions, progress=progress)
    texts = [c.text for c in completions]
    return texts[0] if single else texts
