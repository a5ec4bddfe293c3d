"""Per-token latent activations of prompts, and the contexts that most activate a latent.

A prompt set is read once at the SAE's site at every token (`position all`); each row's first token (the
attention sink) is left out, as in training. The result keeps which row and which token each vector is, so
the same pass gives pooled vectors (last prompt token, mean over response tokens), per-row mean latent
activations and highlighted text snippets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from emlens.capture.extract import run_tokenized
from emlens.capture.items import ExtractItem, TokenizedItem, tokenize_items
from emlens.model import Model
from emlens.sae.artifact import LoadedSAE

HIGHLIGHT = ("«", "»")  # around the token a snippet is about


@dataclass
class TokenActivations:
    """Every token of some rows at one site: vectors, and for each vector its row and position in the row."""

    vectors: Tensor  # (tokens, d_model)
    rows: Tensor  # (tokens,) row of each vector
    positions: Tensor  # (tokens,) position in its row
    tokenized: list[TokenizedItem]

    def pooled(self, position: str) -> Tensor:
        """One vector per row: its last prompt token, or the mean over its response tokens."""
        prompt_lens = torch.tensor([t.prompt_len for t in self.tokenized])
        if position == "last_prompt":
            keep = self.positions == prompt_lens[self.rows] - 1
            return self.vectors[keep][torch.argsort(self.rows[keep], stable=True)]
        keep = self.positions >= prompt_lens[self.rows]
        return row_means(self.vectors[keep], self.rows[keep], len(self.tokenized))

    def without_first_tokens(self) -> TokenActivations:
        keep = self.positions > 0
        return TokenActivations(self.vectors[keep], self.rows[keep], self.positions[keep], self.tokenized)


def row_means(values: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """(n_rows, width): the mean of each row's values (zeros for a row with none)."""
    sums = torch.zeros(n_rows, values.shape[1]).index_add_(0, rows, values.float())
    counts = torch.bincount(rows, minlength=n_rows).clamp(min=1)[:, None]
    return sums / counts


def token_activations(handle: Model, items: Sequence[ExtractItem], site, batch_size: int = 16,
                      max_response_tokens: int | None = None, progress: bool = False) -> TokenActivations:
    """Read `items` at one site, every token (first tokens included: `without_first_tokens` drops them)."""
    tokenized = tokenize_items(handle, items, max_response_tokens)
    vectors, rows, positions = [], [], []
    for batch_rows, counts, found in run_tokenized(handle, tokenized, [site], "all", batch_size=batch_size,
                                                   progress=progress):
        vectors.append(found[site.name].float())
        rows += [torch.full((count,), row) for row, count in zip(batch_rows, counts)]
        positions += [torch.arange(count) for count in counts]  # `all`: a row's vectors are its tokens in order
    return TokenActivations(torch.cat(vectors), torch.cat(rows), torch.cat(positions), tokenized)


def latent_row_means(loaded: LoadedSAE, tokens: TokenActivations, chunk: int = 4096) -> Tensor:
    """(rows, d_sae): each row's mean latent activations over its tokens (first tokens left out), encoded in
    chunks so the (tokens, d_sae) matrix never exists at once."""
    tokens = tokens.without_first_tokens()
    sums = torch.zeros(len(tokens.tokenized), loaded.d_sae)
    for begin in range(0, len(tokens.vectors), chunk):
        sums.index_add_(0, tokens.rows[begin:begin + chunk], loaded.encode(tokens.vectors[begin:begin + chunk]))
    counts = torch.bincount(tokens.rows, minlength=len(tokens.tokenized)).clamp(min=1)[:, None]
    return sums / counts


def top_contexts(loaded: LoadedSAE, tokens: TokenActivations, latents: Sequence[int], tokenizer, per_latent: int = 5,
                 window: int = 8) -> pd.DataFrame:
    """For each latent, its `per_latent` most-activating tokens (first tokens left out) with a snippet of the
    text around each, the token highlighted."""
    tokens = tokens.without_first_tokens()
    latents = [int(latent) for latent in latents]
    acts = torch.cat([loaded.encode(chunk)[:, latents] for chunk in tokens.vectors.split(4096)]) if latents else None
    records = []
    for j, latent in enumerate(latents):
        column = acts[:, j]
        top = torch.topk(column, min(per_latent, len(column)))
        for rank, (value, index) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            if value <= 0:
                break
            row, position = int(tokens.rows[index]), int(tokens.positions[index])
            records.append({"latent": int(latent), "rank": rank, "activation": value, "row": row,
                            "position": position, **snippet(tokenizer, tokens.tokenized[row].ids, position, window)})
    return pd.DataFrame(records, columns=["latent", "rank", "activation", "row", "position", "token", "snippet"])


def snippet(tokenizer, ids: list[int], position: int, window: int) -> dict:
    """The text of `window` tokens before and a few after `position`, that token between « »."""
    before = tokenizer.decode(ids[max(0, position - window):position])
    token = tokenizer.decode(ids[position:position + 1])
    after = tokenizer.decode(ids[position + 1:position + 1 + window // 2])
    return {"token": token, "snippet": f"{before}{HIGHLIGHT[0]}{token}{HIGHLIGHT[1]}{after}".replace("\n", "⏎")}
