"""What to extract from: chats with an optional response, tokenized and batched with left padding."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from emlens.base.errors import EmlensInputError
from emlens.data.nudges import apply_nudge
from emlens.data.questions import question_messages, read_questions
from emlens.generation.engine import left_pad
from emlens.model import Model

POSITIONS = ("last_prompt", "mean_response", "all")


def check_position(position: str) -> str:
    if position not in POSITIONS:
        raise EmlensInputError(f"position '{position}': unknown (known: {', '.join(POSITIONS)})")
    return position


# ---------------------------------------------------------------- inputs


@dataclass
class ExtractItem:
    """One row to read: a chat (list of {role, content}) and optionally the response that followed it.

    `meta` holds scalar columns copied into the store index (ids, labels, groups).
    """

    messages: list[dict]
    response: str | None = None
    meta: dict = field(default_factory=dict)


def items_hash(items: Sequence[ExtractItem]) -> str:
    """A hash of what the model reads (chats and responses), for provenance and store reuse."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.messages, item.response], ensure_ascii=False, sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def items_from_table(frame: pd.DataFrame, with_response: bool = True, keep: Sequence[str] = ()) -> list[ExtractItem]:
    """Rows of an eval table (`messages` JSON + `response`) or of any table with a question/prompt column."""
    prompt_column = next((c for c in ("messages", "paraphrase", "question", "prompt") if c in frame.columns), None)
    if prompt_column is None:
        raise EmlensInputError(f"table: no prompt column (expected messages, paraphrase, question or prompt; "
                               f"found {', '.join(map(str, frame.columns[:12]))})")
    response_column = next((c for c in ("response", "answer") if c in frame.columns), None) if with_response else None
    items = []
    for i, row in enumerate(frame.to_dict("records")):
        raw = row[prompt_column]
        if prompt_column == "messages":
            messages = json.loads(raw) if isinstance(raw, str) else list(raw)
        else:
            messages = [{"role": "user", "content": str(raw)}]
        value = None if response_column is None else row[response_column]
        response = None if value is None else ("" if pd.isna(value) else str(value))
        meta = {"table_row": i, **{k: row[k] for k in keep if k in row}}
        items.append(ExtractItem(messages=messages, response=response, meta=meta))
    return items


TEXT_COLUMNS = ("messages", "response", "answer", "paraphrase", "question", "nudge_text", "prompt")


def items_from_run_table(frame: pd.DataFrame, with_response: bool = True) -> list[ExtractItem]:
    """An eval table's rows, keeping its scalar columns (ids, nudge, labels, scores) for the store index."""
    keep = [c for c in frame.columns if c not in TEXT_COLUMNS]
    return items_from_table(frame, with_response=with_response, keep=keep)


def items_from_questions(source: str, nudges: Sequence = (), system: str | None = None,
                         limit: int | None = None) -> list[ExtractItem]:
    """A question file (any `load_questions` format) or bundled set: every question x nudge, first paraphrase."""

    items = []
    for q in read_questions(source, limit=limit):
        messages = question_messages(q, 0)
        if system is not None:
            messages = [{"role": "system", "content": system}, *[m for m in messages if m["role"] != "system"]]
        for nudge in nudges or [None]:
            chat = apply_nudge(messages, nudge) if nudge is not None else messages
            items.append(ExtractItem(messages=chat,
                                     meta={"question_id": q.id, "nudge": nudge.name if nudge else "none"}))
    return items


@dataclass
class TokenizedItem:
    ids: list[int]
    prompt_len: int


def tokenize_items(handle: Model, items: Sequence[ExtractItem], max_response_tokens: int | None = None) -> list[TokenizedItem]:
    """Chat-template each prompt (with the generation prompt) and append the response tokens, as generation does."""
    tok = handle.tokenizer
    out = []
    for item in items:
        prompt = tok(handle.chat_text(item.messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        response = tok(item.response, add_special_tokens=False)["input_ids"] if item.response else []
        if max_response_tokens is not None:
            response = response[:max_response_tokens]
        out.append(TokenizedItem(ids=list(prompt) + list(response), prompt_len=len(prompt)))
    return out


@dataclass
class Batch:
    """A left-padded batch with the masks every position policy needs."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    position_ids: Int[Tensor, "batch pos"]
    last_prompt: Int[Tensor, " batch"]  # column of each row's last prompt token
    response_mask: Bool[Tensor, "batch pos"]
    rows: list[int]  # indices into the input items

    @property
    def token_mask(self) -> Bool[Tensor, "batch pos"]:
        return self.attention_mask.bool()


def make_batch(tokenized: Sequence[TokenizedItem], rows: list[int], pad_id: int, device) -> Batch:
    ids, mask = left_pad([tokenized[r].ids for r in rows], pad_id, device)
    starts = torch.tensor([ids.shape[1] - len(tokenized[r].ids) for r in rows], device=device)
    prompt_ends = starts + torch.tensor([tokenized[r].prompt_len for r in rows], device=device)
    response = torch.arange(ids.shape[1], device=device)[None, :] >= prompt_ends[:, None]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
    return Batch(ids, mask, positions, prompt_ends - 1, response, rows)


def pool(hidden: Float[Tensor, "batch pos d_model"], batch: Batch, position: str) -> Float[Tensor, "vec d_model"]:
    """Reduce a site's (batch, pos, d_model) activations to the vectors the position policy keeps."""
    hidden = hidden.to(batch.input_ids.device)  # a layer of a sharded model may sit on another GPU
    if position == "last_prompt":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.last_prompt].float()
    if position == "mean_response":
        weights = batch.response_mask.to(torch.float32)
        weights = weights / weights.sum(-1, keepdim=True)
        return torch.einsum("bp,bpd->bd", weights, hidden.float())
    return hidden[batch.token_mask].float()  # "all": row-major, each row's real tokens in order


def vector_counts(tokenized: Sequence[TokenizedItem], position: str) -> list[int]:
    if position == "all":
        return [len(t.ids) for t in tokenized]
    return [1] * len(tokenized)


# ---------------------------------------------------------------- the extraction loop


def _check_items(items: Sequence[ExtractItem], tokenized: Sequence[TokenizedItem], position: str) -> None:
    if not items:
        raise EmlensInputError("extract: no rows to read")
    if position == "mean_response":
        for i, (_item, tok) in enumerate(zip(items, tokenized, strict=False)):
            if len(tok.ids) == tok.prompt_len:
                raise EmlensInputError(f"row {i}: position 'mean_response' needs a non-empty response "
                                       "(read prompts with position 'last_prompt')")


def iter_batches(handle: Model, tokenized: Sequence[TokenizedItem], batch_size: int) -> Iterator[Batch]:
    """Batches of similar length (little padding); each batch remembers which rows it holds."""
    order = sorted(range(len(tokenized)), key=lambda i: len(tokenized[i].ids))
    for start in range(0, len(order), batch_size):
        yield make_batch(tokenized, order[start:start + batch_size], handle.tokenizer.pad_token_id, handle.device)
