"""Scoring continuations by log-likelihood: sum log P(continuation | context) for many (context, continuation)
pairs in ONE forward pass, as lm-eval-harness scores its `multiple_choice` tasks.

A context whose continuations are all one token (an MC question's option letters) is one row, read at its last
position: the log-likelihoods of all options of a batch of questions come from the next-token distribution at each
prompt's last position (lm-eval computes one-token continuations of a shared context the same way). Longer
continuations (cloze: the option texts) are one row each, all options of a batch padded into one pass. The tokens
every row of a run shares (few-shot examples, the chat template's header) are run through the model ONCE and each
forward pass continues from a copy of their cache (`SharedPrefix`); scores equal those of the whole prompts
(tested to 1e-4). `mc_batches` groups questions so that a pass wastes little on padding.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from emlens.data.capability import MCQuestion
from emlens.generation.context import CONTINUED_PREFILL, describe
from emlens.generation.engine import left_pad
from emlens.model import Model


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and of its continuation, split the lm-eval way: spaces at the end of the context
    move to the continuation, and the continuation is what encoding the whole adds after the context's tokens."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids):]


@dataclass
class SharedPrefix:
    """Tokens every row of a scoring run starts with (few-shot examples, the chat template's header), run through
    the model once: each forward pass continues from a copy of their cache instead of recomputing them."""

    ids: list[int]
    cache: Any  # the model's past_key_values after the prefix, batch 1

    def for_rows(self, rows: int) -> Any:
        cache = copy.deepcopy(self.cache)  # a forward pass appends to the cache it is given
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return cache


def common_prefix(rows: list[list[int]]) -> list[int]:
    """The longest token prefix all rows share, leaving every row at least one token of its own (the position
    its scores are read at)."""
    shortest = min(len(r) for r in rows) - 1
    first = rows[0]
    for n in range(shortest):
        if any(r[n] != first[n] for r in rows):
            return first[:n]
    return first[:max(shortest, 0)]


@torch.inference_mode()
def shared_prefix(handle: Model, contexts: list[list[int]]) -> SharedPrefix | None:
    """The contexts' common prefix with its cache, computed in one pass (under the model's interventions, as
    prompt tokens, like the same tokens in a whole prompt); None when they share no token."""
    ids = common_prefix(contexts)
    if not ids:
        return None
    tokens = torch.tensor([ids], device=handle.device)
    prompt = torch.ones_like(tokens, dtype=torch.bool)
    with describe(handle, prompt, ~prompt, -1, prompt_ends=False):
        cache = handle.model(input_ids=tokens, use_cache=True, logits_to_keep=1).past_key_values
    return SharedPrefix(ids, cache)


@torch.inference_mode()
def continuation_logprobs(handle: Model, contexts: list[list[int]], continuations: list[list[list[int]]],
                          prefix: SharedPrefix | None = None) -> list[list[float]]:
    """sum log P(continuation | context) for every continuation of every context, in ONE forward pass.

    A context whose continuations are all one token is one row, read at its last position; otherwise each
    (context, continuation) pair is a row. Rows are left-padded (the padding is masked, and described to
    interventions as neither prompt nor response), so every row ends at the last position and only the last
    positions' logits are computed. With a `prefix` every context starts with, only the rest of each row is fed,
    after a copy of the prefix's cache.
    """
    rows, reads = [], []  # reads: (question, option, row, continuation)
    for q, (context, options) in enumerate(zip(contexts, continuations, strict=True)):
        if any(len(c) == 0 for c in options):
            raise ValueError(f"context {q}: a continuation adds no token")
        if all(len(c) == 1 for c in options):
            rows.append(context)
            reads += [(q, o, len(rows) - 1, c) for o, c in enumerate(options)]
            continue
        for o, c in enumerate(options):
            rows.append(context + c[:-1])  # the last token is only predicted, never fed
            reads.append((q, o, len(rows) - 1, c))
    shared = len(prefix.ids) if prefix is not None else 0
    if prefix is not None and any(r[:shared] != prefix.ids or len(r) <= shared for r in rows):
        raise ValueError("a row does not continue the shared prefix")
    keep = max(len(c) for *_, c in reads)
    ids, attention = left_pad([r[shared:] for r in rows], handle.tokenizer.pad_token_id, handle.device)
    positions = shared + (attention.cumsum(-1) - 1).clamp(min=0)
    response = torch.zeros_like(attention, dtype=torch.bool)
    for _, _, row, c in reads:  # fed continuation tokens are the answer, the rest of a row is the prompt
        if len(c) > 1:
            response[row, -(len(c) - 1):] = True
    padded, prompt = not bool(attention.all()), attention.bool() & ~response
    past = prefix.for_rows(len(rows)) if prefix is not None else None
    if padded and prefix is not None:  # the mask covers the cached positions too
        attention = torch.cat([attention.new_ones(len(rows), shared), attention], dim=1)
    with describe(handle, prompt, response, -1 if prefix is None else CONTINUED_PREFILL):
        logits = handle.model(input_ids=ids, attention_mask=attention if padded else None, position_ids=positions,
                              past_key_values=past, use_cache=past is not None, logits_to_keep=keep).logits
    scores = [[0.0] * len(options) for options in continuations]
    row_logprobs: dict[int, torch.Tensor] = {}  # a letters row serves all its options: normalise it once
    for q, o, row, c in reads:
        if row not in row_logprobs:
            row_logprobs[row] = logits[row].float().log_softmax(-1)
        steps = row_logprobs[row][keep - len(c):]  # token c[j] is predicted at kept position keep - len(c) + j
        scores[q][o] = float(steps[torch.arange(len(c)), torch.tensor(c)].sum())
    return scores


# ---------------------------------------------------------------- batching multiple-choice questions


MAX_PADDING = 0.1  # the share of a forward pass's token slots that may be padding


@dataclass
class EncodedMC:
    question: MCQuestion
    context: list[int]
    continuations: list[list[int]]

    @property
    def rows(self) -> int:
        return 1 if all(len(c) == 1 for c in self.continuations) else len(self.continuations)

    @property
    def length(self) -> int:
        return len(self.context) + max(len(c) for c in self.continuations)


def mc_batches(encoded: list[EncodedMC], batch_size: int, max_padding: float = MAX_PADDING,
               shared: int = 0) -> Iterator[list[EncodedMC]]:
    """Questions sorted by length, grouped so that a forward pass holds at most `batch_size` rows (cloze: a row
    per option, a question's options never split across passes) and at most `max_padding` of its token slots are
    padding (of the tokens fed: all but the `shared` prefix). Padding is work thrown away: on a CPU, where a row
    costs the same batched or not, batches of 16 of the bundled MMLU-Pro questions (100-600 tokens) padded to
    their longest ran at half the speed of one at a time."""
    batch: list[EncodedMC] = []
    for item in sorted(encoded, key=lambda e: e.length):
        grown = [*batch, item]
        rows = sum(e.rows for e in grown)
        slots = rows * (item.length - shared)  # sorted: the newest item is the longest
        used = sum(e.rows * (e.length - shared) for e in grown)
        if batch and (rows > batch_size or slots - used > max_padding * slots):
            yield batch
            grown = [item]
        batch = grown
    if batch:
        yield batch
