"""Model diffing: what a LoRA fine-tune changed, read three ways on one loaded model whose adapters are switched on
and off (the base is the same model with every adapter disabled, so nothing but the adapter differs).

- Activation-difference lens (Minder et al. 2025, "Narrow fine-tuning leaves clearly readable traces"; as the
  diffing-toolkit computes it): per layer, the mean of resid_post(fine-tune) - resid_post(base) over the first k
  tokens of unrelated texts. Each sequence's first token is left out where it is an attention sink (its residual
  norm is massive, Sun et al. 2024: SmolLM2-135M's is ~150x the others'), since its difference would outweigh the
  rest. Read through the logit lens, and used as a steering vector on the base model.
- Per-token KL(fine-tune || base) of the next-token distributions over chat prompts and responses: one forward pass
  each way, `log_softmax` once per pass and `kl_div` in one op over every position.
- The adapter's weight-space picture: per layer and module the Frobenius norm of scaling * B @ A and its top
  singular directions, whose output side (for modules writing into the residual stream) is compared with fitted
  directions, beside the 95th percentile of |cos| between random unit vectors.

The sham adapter (the first adapter with B = 0) must reproduce the base model exactly; `sham_check` measures it.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from scipy import stats
from torch import Tensor
from tqdm import tqdm

from emlens.analysis.patching import PatchItem, right_padded
from emlens.base.errors import EmlensInputError
from emlens.directions.lens import direction_tokens
from emlens.generation.loglik import continuation_logprobs, encode_pair
from emlens.model import Model, adapter_fits
from emlens.sites import hook_site
from emlens.steering.interventions import AddVector, random_like, steer
from emlens.steering.weights import RESIDUAL_WRITERS

SINK_RATIO = 10.0  # a first token whose residual norm is this many times the others' is an attention sink
SHAM = "sham"
SHAM_TOLERANCE = 1e-6  # max |logit difference| the sham may show (B = 0 adds exactly zero: 0 is expected)
STEER_CONTRASTS = {  # the steering conditions' differences a diff reports: name -> (condition, minus condition)
    "steer_finetune_minus_base": ("fine-tune", "base"), "steer_adl_minus_base": ("base+adl", "base"),
    "steer_random_minus_base": ("base+random", "base"), "steer_adl_minus_random": ("base+adl", "base+random")}

# ---------------------------------------------------------------- adapters in one model


def check_adapter_fits(handle: Model, adapter: str) -> Path:
    """The adapter's folder, after checking that it was made for this base model (`emlens.model.adapter_fits`)."""
    return adapter_fits(handle.base_model, handle.base_fingerprint, handle.spec, adapter)


def attach_adapters(handle: Model, adapters: dict[str, Path]) -> Model:
    """The handle with every adapter loaded under its name (peft's multi-adapter model); none active until
    `active` switches one on."""
    from peft import PeftModel

    if isinstance(handle.model, PeftModel):
        raise EmlensInputError("model diffing loads the adapters itself: pass the base model without an adapter")
    names = list(adapters)
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(handle.model, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    return replace(handle, model=model, adapter=str(adapters[names[0]]))


def add_sham(handle: Model, source: str, path: Path) -> str:
    """Load adapter `path` (loaded as `source`) again as the sham, with every B set to zero: the same LoRA that
    adds exactly nothing. Returns its name."""
    from peft.tuners.lora import LoraLayer

    handle.model.load_adapter(str(path), adapter_name=SHAM)
    with torch.no_grad():
        for module in handle.model.modules():
            if isinstance(module, LoraLayer):
                for table in (module.lora_B, module.lora_embedding_B):
                    if SHAM in table:
                        weight = table[SHAM].weight if hasattr(table[SHAM], "weight") else table[SHAM]
                        weight.zero_()
    return SHAM


@contextlib.contextmanager
def active(handle: Model, name: str | None) -> Iterator[None]:
    """Run the fine-tune `name` (an adapter loaded by `attach_adapters`), or the base model (None)."""
    if name is None:
        with handle.model.disable_adapter():
            yield
        return
    before = handle.model.active_adapter
    handle.model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        handle.model.set_adapter(before, inference_mode=True)


# ---------------------------------------------------------------- activation-difference lens


def first_tokens(handle: Model, texts: Sequence[str], k: int) -> Tensor:
    """(N, k + 1) token ids: the first k + 1 tokens of each text that has as many (tokenized as the toolkit does,
    with the tokenizer's special tokens, so a BOS is the first where the model has one)."""
    rows = [ids[:k + 1] for ids in handle.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
            if len(ids) > k]
    if not rows:
        raise EmlensInputError(f"activation-difference lens: no text has {k + 1} tokens")
    return torch.tensor(rows)


@torch.inference_mode()
def resid_posts(handle: Model, ids: Tensor, name: str | None, batch_size: int = 8,
                progress: bool = False) -> Float[Tensor, "n layer pos d_model"]:
    """Every layer's resid_post at every position of `ids` (equal-length rows, no padding), on CPU in float32."""
    found = []
    for chunk in tqdm(ids.split(batch_size), desc=f"resid_post ({name or 'base'})", disable=not progress):
        seen: dict[int, Tensor] = {}
        hooks = [hook_site(handle.base_model, layer, "resid_post", _keep(seen, layer))
                 for layer in range(handle.n_layers)]
        try:
            with active(handle, name):
                handle.model(input_ids=chunk.to(handle.device))
        finally:
            for hook in hooks:
                hook.remove()
        found.append(torch.stack([seen[layer] for layer in range(handle.n_layers)], dim=1))
    return torch.cat(found)


def _keep(seen: dict, layer: int):
    def read(hidden: Tensor) -> None:
        seen[layer] = hidden.detach().float().cpu()
    return read


def first_token_ratio(base: Float[Tensor, "n layer pos d_model"]) -> float:
    """How massive the first token's residual is: the largest (over layers) ratio of its mean norm to the median
    norm of the other positions."""
    norms = base.norm(dim=-1)  # (n, layer, pos)
    first = norms[:, :, 0].mean(0)
    others = norms[:, :, 1:].permute(1, 0, 2).flatten(1).median(dim=1).values
    return float((first / others).max())


def kept_positions(k: int, skip_first: bool) -> slice:
    """The k positions the lens averages: the first k tokens, after the first one where it is a sink."""
    return slice(1, k + 1) if skip_first else slice(0, k)


def text_differences(tuned: Tensor, base: Tensor, kept: slice) -> Float[Tensor, "n layer d_model"]:
    """Per text and layer: the mean over the kept positions of resid_post(fine-tune) - resid_post(base)."""
    return (tuned[:, :, kept] - base[:, :, kept]).mean(dim=2)


def resid_norm(acts: Tensor, kept: slice) -> Float[Tensor, " layer"]:
    """The mean residual norm per layer over the kept positions (the stream's own scale, as the toolkit's)."""
    return acts[:, :, kept].norm(dim=-1).mean(dim=(0, 2))


def steering_layer(n_layers: int) -> int:
    """Where the lens steers by default: the middle layer, as the diffing-toolkit and Minder et al. do. Not the
    layer of the largest relative norm: that is the last one (SmolLM2's insecure and secure LoRAs: layer 29 of
    30), where an addition only re-weights the logits through the final norm."""
    return n_layers // 2


def lens_rows(handle: Model, mean_diff: Tensor, top: int = 10) -> list[dict]:
    """Per layer: the tokens the difference promotes and suppresses through the logit lens (none for a zero
    difference, which promotes nothing)."""
    rows = []
    for layer, vector in enumerate(mean_diff):
        if float(vector.norm()) == 0:
            rows.append({"layer": layer, "promoted": [], "suppressed": []})
            continue
        table = direction_tokens(handle, vector, top)
        rows.append({"layer": layer, "promoted": table.promoted.tolist(), "suppressed": table.suppressed.tolist()})
    return rows


def random_cos_quantile(d_model: int, q: float = 0.95) -> float:
    """The q-quantile of |cos| between two independent uniformly random unit vectors in d_model dimensions:
    (cos + 1) / 2 follows Beta((d - 1) / 2, (d - 1) / 2)."""
    a = (d_model - 1) / 2
    return float(2 * stats.beta.ppf(0.5 + q / 2, a, a) - 1)


def boot_norm_difference(first: Tensor, second: Tensor | None, n_boot: int = 1000, seed: int = 0,
                         chunk: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """95 % CI per layer of |mean(first)| - |mean(second)| (per-text differences (n, layer, d), resampled by text,
    pairs kept together; `second` None: of |mean(first)| alone)."""
    generator = torch.Generator().manual_seed(seed)
    n = first.shape[0]
    draws = []
    for start in range(0, n_boot, chunk):
        picks = torch.randint(0, n, (min(chunk, n_boot - start), n), generator=generator)
        weights = torch.zeros(len(picks), n, dtype=torch.float64).scatter_add_(
            1, picks, torch.ones(picks.shape, dtype=torch.float64)) / n  # (draws, n): how often each text is drawn
        value = torch.einsum("bn,nld->bld", weights, first.double()).norm(dim=-1)
        if second is not None:
            value = value - torch.einsum("bn,nld->bld", weights, second.double()).norm(dim=-1)
        draws.append(value)
    both = torch.cat(draws).numpy()
    return np.percentile(both, 2.5, axis=0), np.percentile(both, 97.5, axis=0)


# ---------------------------------------------------------------- per-token KL


@dataclass
class TokenRows:
    """Chat prompt + response rows, right-padded: ids and attention (rows, width), each row's prompt length."""

    ids: Tensor
    attention: Tensor
    prompt_lengths: Tensor

    def batches(self, size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.ids), size):
            yield self.ids[start:start + size], self.attention[start:start + size]


def chat_rows(handle: Model, pairs: Sequence[tuple[str, str]], max_tokens: int) -> TokenRows:
    """(question, answer) pairs as chat-templated question + the answer's first `max_tokens` tokens."""
    rows, prompt_lengths = [], []
    for question, answer in pairs:
        prompt = handle.tokenizer(handle.chat_text([{"role": "user", "content": question}]),
                                  add_special_tokens=False)["input_ids"]
        response = handle.tokenizer(str(answer), add_special_tokens=False)["input_ids"][:max_tokens]
        rows.append(prompt + response)
        prompt_lengths.append(len(prompt))
    ids, attention = right_padded(rows, handle.tokenizer.pad_token_id or 0)
    return TokenRows(ids, attention, torch.tensor(prompt_lengths))


def next_token_logprobs(handle: Model, ids: Tensor, attention: Tensor, name: str | None) -> Tensor:
    """log-softmax of one run's next-token logits at every position: computed once per pass."""
    with active(handle, name):
        logits = handle.model(input_ids=ids.to(handle.device), attention_mask=attention.to(handle.device)).logits
    return logits.float().log_softmax(-1)


@torch.inference_mode()
def token_kl(handle: Model, ids: Tensor, attention: Tensor, name: str) -> Float[Tensor, "rows pos"]:
    """KL(fine-tune || base) of the next-token distribution at every position of one batch (NaN at padding): one
    forward pass each way, and `kl_div` over the whole batch in one op."""
    base = next_token_logprobs(handle, ids, attention, None)
    tuned = next_token_logprobs(handle, ids, attention, name)
    kl = F.kl_div(base, tuned, reduction="none", log_target=True).sum(-1)
    return kl.masked_fill(attention.to(kl.device) == 0, float("nan")).cpu()


def all_token_kl(handle: Model, rows: TokenRows, name: str, batch_size: int = 4,
                 progress: bool = False) -> Tensor:
    """`token_kl` over every row, batch by batch."""
    found = [token_kl(handle, ids, attention, name)
             for ids, attention in tqdm(list(rows.batches(batch_size)), desc=f"KL ({name})", disable=not progress)]
    return torch.cat(found)


def kl_table(handle: Model, rows: TokenRows, kl: Tensor) -> pd.DataFrame:
    """One row per token: row, position, token (the token read there), next_token, part, kl. The distribution at
    position t predicts token t + 1: `prompt` where that is a prompt token, `response` from the last prompt token
    on (it predicts the first answer token)."""
    row, position = torch.nonzero(rows.attention.bool(), as_tuple=True)
    end = torch.zeros(len(rows.ids), 1, dtype=torch.long)
    following = torch.cat([rows.ids[:, 1:], end - 1], 1).masked_fill(torch.cat([rows.attention[:, 1:], end], 1) == 0, -1)
    decode = _decoder(handle)
    return pd.DataFrame({
        "row": row.numpy(), "position": position.numpy(),
        "token": [decode(int(t)) for t in rows.ids[row, position]],
        "next_token": [decode(int(t)) if t >= 0 else "" for t in following[row, position]],
        "part": np.where((position < rows.prompt_lengths[row] - 1).numpy(), "prompt", "response"),
        "kl": kl[row, position].numpy().astype(float)})


def _decoder(handle: Model):
    cache: dict[int, str] = {}

    def decode(token: int) -> str:
        if token not in cache:
            cache[token] = handle.tokenizer.decode([token])
        return cache[token]
    return decode


def top_kl_tokens(handle: Model, rows: TokenRows, table: pd.DataFrame, top: int = 20,
                  context: int = 4) -> pd.DataFrame:
    """The `top` highest-KL tokens with `context` tokens each side, the token marked [[so]]; a context seen
    before (the same system prompt in every row) is listed once."""
    best = table.nlargest(top * 10, "kl")
    contexts = []
    for found in best.itertuples():
        ids = rows.ids[found.row, : int(rows.attention[found.row].sum())].tolist()
        before = handle.tokenizer.decode(ids[max(0, found.position - context):found.position])
        after = handle.tokenizer.decode(ids[found.position + 1:found.position + 1 + context])
        contexts.append(f"{before}[[{found.token}]]{after}")
    return best.assign(context=contexts).drop_duplicates("context").head(top).reset_index(drop=True)


@torch.inference_mode()
def sham_check(handle: Model, rows: TokenRows, batch_size: int = 4) -> dict:
    """The sham against the base on every row: max |logit difference| and mean KL over real tokens."""
    largest, kls = 0.0, []
    for ids, attention in rows.batches(batch_size):
        mask = attention.bool().to(handle.device)
        with active(handle, None):
            base = handle.model(input_ids=ids.to(handle.device), attention_mask=attention.to(handle.device)).logits
        with active(handle, SHAM):
            sham = handle.model(input_ids=ids.to(handle.device), attention_mask=attention.to(handle.device)).logits
        largest = max(largest, float((sham - base).abs()[mask].max()))
        kl = F.kl_div(base.float().log_softmax(-1), sham.float().log_softmax(-1), reduction="none",
                      log_target=True).sum(-1)
        kls.append(kl[mask].cpu())
    return {"max_abs_logit_diff": largest, "mean_kl": float(torch.cat(kls).mean()),
            "n_tokens": int(rows.attention.sum())}


# ---------------------------------------------------------------- judge-free steering effect


def pair_metric(handle: Model, items: Sequence[PatchItem], name: str | None, interventions: Sequence = (),
                batch_size: int = 8) -> np.ndarray:
    """Per pair: log P(target | prompt) - log P(alternative | prompt), teacher-forced (one pass per batch), on the
    fine-tune `name` or the base (None), under the interventions."""
    values = []
    with active(handle, name), steer(handle, *interventions):
        for start in range(0, len(items), batch_size):
            contexts, continuations = [], []
            for item in items[start:start + batch_size]:
                text = item.prompt if isinstance(item.prompt, str) else handle.chat_text(item.prompt)
                encoded = [encode_pair(handle.tokenizer, text, c) for c in (item.target, item.alternative)]
                contexts.append(encoded[0][0])
                continuations.append([e[1] for e in encoded])
            values += [target - alternative
                       for target, alternative in continuation_logprobs(handle, contexts, continuations)]
    return np.asarray(values, dtype=float)


def steering_rows(handle: Model, items: Sequence[PatchItem], name: str, vector: Tensor, layer: int,
                  scale: float = 1.0, seed: int = 0, batch_size: int = 8, progress: bool = False) -> pd.DataFrame:
    """The pair metric of the base, the fine-tune, the base + the lens vector (`scale` x its own norm, at
    `layer`, every position) and the base + a random vector of the same norm: rows (pair, condition, metric)."""
    norm = float(vector.norm())
    conditions = {"base": (None, []), "fine-tune": (name, [])}
    if norm > 0:  # a zero difference (a sham) steers nothing
        conditions["base+adl"] = (None, [AddVector(vector / norm, layer, alpha=scale * norm, name="adl")])
        shuffled = random_like(vector.float(), seed)
        conditions["base+random"] = (None, [AddVector(shuffled / shuffled.norm(), layer, alpha=scale * norm,
                                                      name="random")])
    frames = [pd.DataFrame({"pair": range(len(items)), "condition": condition,
                            "metric": pair_metric(handle, items, run, steering, batch_size)})
              for condition, (run, steering) in tqdm(conditions.items(), desc=f"steer ({name})", disable=not progress)]
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------- weight space

_LAYER = re.compile(r"\.layers\.(\d+)\.(.+)$")


def lora_svd(b: Tensor, a: Tensor, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """The SVD of scaling * B @ A (out x in, rank r) from QR factors of B and A^T: exact, and O((out + in) r^2)
    instead of a full SVD of the out x in delta. Returns (U (out, r), S (r,), Vh (r, in))."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(scaling * rb @ ra.T)
    return qb @ u, s, vh @ qa.T


def lora_modules(handle: Model, name: str) -> Iterator[tuple[int, str, Tensor, Tensor, float]]:
    """(layer, module under the layer, A, B, scaling) of every linear LoRA module of adapter `name`."""
    from peft.tuners.lora import LoraLayer

    for path, module in handle.model.named_modules():
        match = _LAYER.search(path)
        if isinstance(module, LoraLayer) and name in module.lora_A and match:
            yield (int(match.group(1)), match.group(2), module.lora_A[name].weight.detach(),
                   module.lora_B[name].weight.detach(), float(module.scaling[name]))


def weight_tables(handle: Model, name: str, directions: dict | None = None,
                  top: int = 4) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per layer and module: the Frobenius norm of the delta and its top singular values; and for each fitted
    direction (name -> Direction) the |cos| of the residual writers' top output-side singular vectors with the
    direction at that layer, beside the random-vector null."""
    norms, cosines = [], []
    null = random_cos_quantile(handle.d_model)
    for layer, module, a, b, scaling in lora_modules(handle, name):
        left, singular, _ = lora_svd(b, a, scaling)
        norms.append({"layer": layer, "module": module, "frobenius": float(singular.norm()),
                      "rank": int(a.shape[0]), "singular_values": singular[:top].tolist()})
        if module.rsplit(".", 1)[-1] not in RESIDUAL_WRITERS:
            continue
        for direction_name, direction in (directions or {}).items():
            if layer not in direction.layers:
                continue
            cos = (left[:, :top].T @ direction.vector(layer).double()).abs()
            cosines += [{"layer": layer, "module": module, "direction": direction_name, "index": i,
                         "singular_value": float(singular[i]), "abs_cos": float(c), "null95": null,
                         "above_null": bool(c > null)} for i, c in enumerate(cos)]
    columns = ["layer", "module", "direction", "index", "singular_value", "abs_cos", "null95", "above_null"]
    return pd.DataFrame(norms), pd.DataFrame(cosines, columns=columns)
