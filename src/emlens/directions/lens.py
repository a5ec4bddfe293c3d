"""The logit lens: what a direction writes, and what the residual stream already predicts at each layer, read
through the model's own final norm and unembedding (nostalgebraist's logit lens; the direction form as in the EM
steering papers, which name a direction by the tokens it promotes).

A direction is put through the final norm as if it were a residual (the norm is scale-free, so its length does not
matter; Gemma's (1 + w) gain and GPT-NeoX's LayerNorm are the models' own) and then the unembedding: its top
tokens are those it promotes, its bottom ones those it suppresses. The residual lens reads each layer's
resid_post at the last prompt token the same way. Logits before any final soft-capping: capping is monotone, so the
ranking is the model's.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor

from emlens.base.errors import EmlensInputError
from emlens.generation.hf_engine import capture_hf
from emlens.model import Model
from emlens.sites import decoder_of, site_name

FINAL_NORMS = ("norm", "final_layer_norm", "final_norm", "ln_f")  # the decoder's last norm, by family


def final_norm(handle: Model):
    decoder = decoder_of(handle.base_model)
    for name in FINAL_NORMS:
        if hasattr(decoder, name):
            return getattr(decoder, name)
    raise EmlensInputError(f"{handle.config.model_type}: no final norm found (looked for {', '.join(FINAL_NORMS)})")


@torch.inference_mode()
def unembed(handle: Model, residual: Tensor) -> Tensor:
    """Logits of residual vectors (..., d_model) through the final norm and the unembedding."""
    head = handle.base_model.get_output_embeddings()
    x = residual.to(device=head.weight.device, dtype=head.weight.dtype)
    return head(final_norm(handle)(x)).float()


def direction_tokens(handle: Model, vector: Tensor, top: int = 10) -> pd.DataFrame:
    """The tokens a direction promotes and suppresses: one row per rank (promoted, promoted_logit, suppressed,
    suppressed_logit), logits of the normed direction through the unembedding."""
    vector = torch.as_tensor(vector).flatten()
    if vector.shape[0] != handle.d_model:
        raise EmlensInputError(f"direction of width {vector.shape[0]}: the model's residual is {handle.d_model} wide")
    logits = unembed(handle, vector[None])[0][: len(handle.tokenizer)]  # padded vocabularies have unused rows
    up, down = logits.topk(top), (-logits).topk(top)
    return pd.DataFrame({"rank": range(1, top + 1),
                         "promoted": _tokens(handle, up.indices), "promoted_logit": up.values.tolist(),
                         "suppressed": _tokens(handle, down.indices), "suppressed_logit": (-down.values).tolist()})


LENS_TOKENS = 10  # recorded in each fitted direction's cfg.json, each way


def lens_record(handle: Model, vector: Tensor, layer: int, top: int = LENS_TOKENS) -> dict:
    """What a direction artifact records of its lens: the layer read and its top tokens each way."""
    table = direction_tokens(handle, vector, top)
    return {"layer": layer, "promoted": table.promoted.tolist(), "suppressed": table.suppressed.tolist()}


def token_line(lens: dict, count: int = 8) -> str:
    """One line for a direction's card: the tokens it promotes, then those it suppresses."""
    return (f"promotes {', '.join(repr(t) for t in lens['promoted'][:count])}; "
            f"suppresses {', '.join(repr(t) for t in lens['suppressed'][:count])}")


@torch.inference_mode()
def residual_lens(handle: Model, prompts: Sequence[str | list[dict]], top: int = 5,
                  layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Each layer's next-token reading at the last prompt token: rows (prompt, layer, rank, token, prob,
    final_prob), where final_prob is the probability that layer gives to the model's own next token (its top token
    after the last layer), so the layer where the answer forms shows. A prompt is text, or a chat (templated)."""
    layers = list(range(handle.n_layers)) if layers is None else list(layers)
    if any(not 0 <= layer < handle.n_layers for layer in layers):
        raise EmlensInputError(f"layers {layers}: the model has layers 0-{handle.n_layers - 1}")
    rows = []
    for index, prompt in enumerate(prompts):
        text = prompt if isinstance(prompt, str) else handle.chat_text(prompt)
        residuals = _last_token_residuals(handle, text, layers)
        probs = unembed(handle, residuals)[:, : len(handle.tokenizer)].softmax(-1)
        final = int(probs[-1].argmax()) if layers[-1] == handle.n_layers - 1 else int(_next_token(handle, text))
        for layer, row in zip(layers, probs, strict=True):
            best = row.topk(top)
            rows += [{"prompt": index, "layer": layer, "rank": rank + 1, "token": token, "prob": float(p),
                      "final_prob": float(row[final])}
                     for rank, (token, p) in enumerate(zip(_tokens(handle, best.indices), best.values, strict=True))]
    return pd.DataFrame(rows, columns=["prompt", "layer", "rank", "token", "prob", "final_prob"])


def _last_token_residuals(handle: Model, text: str, layers: list[int]) -> Tensor:
    """resid_post of each layer at the text's last token, (len(layers), d_model): the hf engine's capture."""
    ids = handle.tokenizer(text, add_special_tokens=False)["input_ids"]
    found = capture_hf(handle, [(ids, len(ids))], [(layer, "resid_post") for layer in layers], "last_prompt")[0]
    return torch.cat([found[site_name(layer)] for layer in layers])


def _next_token(handle: Model, text: str) -> int:
    ids = handle.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(handle.device)
    return int(handle.model(input_ids=ids, logits_to_keep=1).logits[0, -1].argmax())


def _tokens(handle: Model, ids: Tensor) -> list[str]:
    return [handle.tokenizer.decode([int(i)]) for i in ids]
