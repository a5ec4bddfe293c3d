"""The intervention protocol: what an intervention may read during a forward pass, and how it is attached.

An intervention is any object with `attach(model, ctx) -> ContextManager` (see emlens.steering). While it is
attached, its hooks read the model's `ForwardContext`: which positions of the CURRENT forward pass are prompt
tokens and which are response tokens, per row. Padding is neither, so it is never steered.

Who fills the context:
- the generation engine and the answer-distribution readers describe every pass they make (`describe`);
- any other forward pass (a user's plain `model(**batch)`, HF `generate`, activation extraction) is described
  from its attention mask by a pre-hook on the decoder that `intervene` installs: real tokens of a pass that
  starts at position 0 are prompt tokens, the tokens of later passes (decode steps) are response tokens.

Response positions, for an intervention, are the positions that predict an answer token: every response token
fed and the last prompt token (its output is the first answer token's distribution), the common convention. So
response-only steering moves a one-token answer (a multiple-choice letter, a rating) too. A pass that feeds a
prefix the prompt continues after (a shared KV-cache prefix) says so: its last token is not the prompt's last.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from jaxtyping import Bool
from torch import Tensor

from emlens.model import Model
from emlens.sites import decoder_of

CONTINUED_PREFILL = -2  # the `step` of prompt tokens fed after a cached prefix: no sequence starts in this pass


@dataclass
class ForwardContext:
    """Per-row token masks of the current forward pass, for interventions.

    `prompt_mask` and `response_mask` are (batch, positions) booleans for the positions of the CURRENT
    forward call (all prompt positions at prefill, one position per row at each decode step); `last_prompt_mask`
    marks each row's last prompt token when this pass holds the end of the prompt.
    """

    prompt_mask: Bool[Tensor, "batch pos"] | None = None
    response_mask: Bool[Tensor, "batch pos"] | None = None
    last_prompt_mask: Bool[Tensor, "batch pos"] | None = None
    step: int = -1  # -1 during prefill, then the index of the response token being fed (or CONTINUED_PREFILL)
    source: Literal["engine", "attention_mask"] | None = None
    active: list = field(default_factory=list)  # interventions attached now (engines that hook elsewhere add them)
    described: int = 0  # how deeply `intervene` blocks are nested (the mask-describing hooks are installed once)

    def set(self, prompt_mask: Tensor, response_mask: Tensor, step: int, source: str = "engine",
            prompt_ends: bool = True) -> None:
        self.prompt_mask, self.response_mask, self.step, self.source = prompt_mask, response_mask, step, source
        self.last_prompt_mask = last_true(prompt_mask) if prompt_ends else torch.zeros_like(prompt_mask)

    def predicts_answer(self) -> Tensor:
        """The response positions of an intervention: the response tokens and the last prompt token."""
        return self.response_mask | self.last_prompt_mask

    def clear(self) -> None:
        self.prompt_mask = self.response_mask = self.last_prompt_mask = None
        self.step = -1
        self.source = None


class Intervention(Protocol):
    name: str

    def attach(self, model: Model, ctx: ForwardContext) -> contextlib.AbstractContextManager: ...


def context_of(model: Model) -> ForwardContext:
    """The model's one ForwardContext (created on first use)."""
    return model.runtime.setdefault("forward_context", ForwardContext())


def last_true(mask: Tensor) -> Tensor:
    """(batch, pos) booleans: each row's last True position of `mask` (none for a row without one)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=1, keepdim=True).values
    return mask & (positions == last)


@contextlib.contextmanager
def describe(model: Model, prompt_mask: Tensor, response_mask: Tensor, step: int,
             prompt_ends: bool = True) -> Iterator[None]:
    """Publish the masks of one forward pass the caller is about to make; `prompt_ends=False` for a pass of a
    prefix the prompt goes on after."""
    ctx = context_of(model)
    ctx.set(prompt_mask, response_mask, step, source="engine", prompt_ends=prompt_ends)
    try:
        yield
    finally:
        ctx.clear()


def _masks_from_attention(ctx: ForwardContext):
    def fill(module, args, kwargs) -> None:
        if ctx.source == "engine":
            return
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            return
        batch, length = tokens.shape[:2]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[1] >= length:
            real, prefill = mask[:, -length:].bool(), mask.shape[1] == length
        else:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            real = torch.ones((batch, length), dtype=torch.bool, device=tokens.device)
            prefill = cache is None or cache.get_seq_length() == 0
        none = torch.zeros_like(real)
        ctx.set(real if prefill else none, none if prefill else real, -1 if prefill else 0, source="attention_mask")

    def clear(module, args, kwargs, output) -> None:
        if ctx.source == "attention_mask":
            ctx.clear()

    return fill, clear


@contextlib.contextmanager
def _described_by_attention_mask(model: Model) -> Iterator[None]:
    """Install (once per model, however deeply nested) the hooks that describe undescribed passes."""
    ctx = context_of(model)
    depth = ctx.described
    ctx.described = depth + 1
    handles = []
    if depth == 0:
        fill, clear = _masks_from_attention(ctx)
        decoder = decoder_of(model.base_model)
        handles = [decoder.register_forward_pre_hook(fill, with_kwargs=True),
                   decoder.register_forward_hook(clear, with_kwargs=True)]
    try:
        yield
    finally:
        ctx.described = depth
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def intervene(model: Model, interventions: Iterable[Any]) -> Iterator[None]:
    """Attach interventions for every forward pass inside the block (engine or not); never on padding."""
    interventions = list(interventions)
    ctx = context_of(model)
    with contextlib.ExitStack() as stack:
        if interventions:
            stack.enter_context(_described_by_attention_mask(model))
        for intervention in interventions:
            stack.enter_context(intervention.attach(model, ctx))
        ctx.active.extend(interventions)
        try:
            yield
        finally:
            del ctx.active[len(ctx.active) - len(interventions):]
