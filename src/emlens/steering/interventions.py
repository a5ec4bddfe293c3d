"""Interventions on the residual stream, as context managers attached to a model.

- `AddVector`: h <- h + alpha * v at one site (any of the five TransformerLens site kinds), on prompt tokens,
  response positions (every answer token and the last prompt token, whose output is the first answer token's
  distribution) or both (never padding).
- `Ablate`: directional ablation, h <- h - (h . v) v for unit v, at the input of every decoder layer and at every
  attention and MLP output, so the residual stream never holds the direction: no sublayer reads what another
  wrote along it, and resid_mid / resid_post are orthogonal to it at every layer (Arditi et al. 2024). Not at a sequence's
  first token unless asked: in a causal LM its residual is the same for every prompt, so it carries nothing
  about the prompt, and it holds the attention sink's massive activation (SmolLM2-135M, layer 15: |x| = 25,054,
  against about 170 elsewhere), so projecting there perturbs the sink for any direction, random ones included.
- `Clamp`: ablate-then-add at one site, h <- h - (h . u) u + alpha u: the stream's projection on u there is alpha,
  whatever the model put there (layers after it may write along u again; `Ablate` is what removes it everywhere).
- `compose(...)`: several at once.
- `random_like(v)`: a random vector of the same norm, the control beside every steering run.
- `steer(model, *interventions)`: attach them for every forward pass inside the block: emlens's engine, the
  answer-distribution readers, activation extraction, a plain `model(**batch)` or HF `generate`. The per-row
  token masks come from the engine where it runs the pass, else from the attention mask.

Every hook is placed through `emlens.sites.hook_site`, the one table from site kind to module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from emlens.base.errors import EmlensInputError
from emlens.generation.context import ForwardContext, context_of, intervene
from emlens.model import Model
from emlens.sites import SITE_KINDS, check_site_kind, hook_site

Positions = Literal["all", "prompt", "response"]


def position_mask(ctx: ForwardContext, positions: Positions, shape: torch.Size, device) -> Tensor | None:
    """(batch, pos, 1) float mask of the positions to change in this forward pass; None means all of them."""
    if ctx is None or ctx.prompt_mask is None or tuple(ctx.prompt_mask.shape) != tuple(shape[:2]):
        return None  # a pass nobody described (no attention mask, or a shape the masks do not fit)
    if positions == "prompt":
        mask = ctx.prompt_mask
    elif positions == "response":
        mask = ctx.predicts_answer()
    else:
        mask = ctx.prompt_mask | ctx.response_mask
    return mask.to(device=device, dtype=torch.float32)[..., None]


def first_token_kept(ctx: ForwardContext, hidden: Tensor) -> Tensor | None:
    """(batch, pos, 1) mask that is 0 at each sequence's first real token; None when no first token is here.

    The prompt mask finds it under left padding; decode steps never hold it. A pass nobody described is taken
    to start at position 0.
    """
    batch, length = hidden.shape[:2]
    if ctx is not None and ctx.prompt_mask is not None and tuple(ctx.prompt_mask.shape) == (batch, length):
        if ctx.step != -1:
            return None
        first = ctx.prompt_mask.float().argmax(dim=1).to(hidden.device)
    elif length > 1:
        first = torch.zeros(batch, dtype=torch.long, device=hidden.device)
    else:
        return None
    keep = torch.ones(batch, length, device=hidden.device, dtype=hidden.dtype)
    keep[torch.arange(batch, device=hidden.device), first] = 0
    return keep[..., None]


class OnDevice:
    """A vector copied once to each device that asks for it (a model sharded across GPUs has layers on several)."""

    def __init__(self, vector: Tensor):
        self.copies = {vector.device: vector}

    def on(self, device: torch.device) -> Tensor:
        if device not in self.copies:
            self.copies[device] = next(iter(self.copies.values())).to(device)
        return self.copies[device]


def _unit(v: Tensor) -> Tensor:
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise EmlensInputError("steering vector has zero or non-finite norm")
    return v / norm


def _check_width(model: Model, v: Tensor, what: str) -> None:
    if v.ndim != 1 or v.shape[0] != model.d_model:
        raise EmlensInputError(f"{what}: vector of shape {tuple(v.shape)} does not match the model's d_model "
                               f"{model.d_model}")


def _check_site_write(model: Model, vector: Tensor, layer: int, site: str, what: str) -> None:
    """A vector written at `blocks.{layer}.hook_{site}`: its width, the layer and the site kind, one line each."""
    _check_width(model, vector, what)
    _check_layer(model, layer, what)
    if site not in SITE_KINDS:
        raise EmlensInputError(f"{what}: site '{site}' unknown (known: {', '.join(SITE_KINDS)})")
    check_site_kind(model.base_model, site)


def _check_layer(model: Model, layer: int, what: str) -> None:
    if not 0 <= layer < model.n_layers:
        raise EmlensInputError(f"{what}: layer {layer} out of range (model has {model.n_layers} layers)")


@contextlib.contextmanager
def hooked(handles) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class AddVector:
    """Add alpha * vector at `blocks.{layer}.hook_{site}` on the chosen positions."""

    vector: Float[Tensor, " d_model"]
    layer: int
    alpha: float = 1.0
    site: str = "resid_post"
    positions: Positions = "all"
    name: str = "add"

    def attach(self, model: Model, ctx: ForwardContext | None = None) -> contextlib.AbstractContextManager:
        _check_site_write(model, self.vector, self.layer, self.site, self.name)
        ctx = context_of(model) if ctx is None else ctx
        delta = OnDevice((self.alpha * self.vector).to(dtype=model.dtype))

        def add(hidden: Tensor) -> Tensor:
            mask = position_mask(ctx, self.positions, hidden.shape, hidden.device)
            change = delta.on(hidden.device)
            return hidden + (change if mask is None else mask.to(hidden.dtype) * change)

        return hooked([hook_site(model.base_model, self.layer, self.site, add, write=True)])

    def vllm_ops(self, model: Model) -> list[dict]:
        """The same addition as plain data, for engines that hook elsewhere (vLLM's workers)."""
        _check_site_write(model, self.vector, self.layer, self.site, self.name)
        return [{"site": self.site, "layer": self.layer, "add": (self.alpha * self.vector).float().cpu(),
                 "positions": self.positions}]


@dataclass
class Ablate:
    """Project the unit direction out of the residual stream entering every layer and leaving the last one."""

    vector: Float[Tensor, " d_model"]
    name: str = "ablate"
    first_token: bool = False  # also at each sequence's first token (the attention sink); see the module doc

    def attach(self, model: Model, ctx: ForwardContext | None = None) -> contextlib.AbstractContextManager:
        _check_width(model, self.vector, self.name)
        unit = OnDevice(_unit(self.vector.float()).to(dtype=model.dtype))
        ctx = context_of(model) if ctx is None else ctx

        def project_out(hidden: Tensor) -> Tensor:
            direction = unit.on(hidden.device)
            removed = (hidden @ direction)[..., None] * direction
            for mask in (position_mask(ctx, "all", hidden.shape, hidden.device),
                         None if self.first_token else first_token_kept(ctx, hidden)):
                if mask is not None:
                    removed = mask.to(hidden.dtype) * removed
            return hidden - removed

        causal_lm = model.base_model
        handles = [hook_site(causal_lm, layer, kind, project_out, write=True)
                   for layer in range(model.n_layers) for kind in ABLATED_SITES]
        return hooked(handles)

    def vllm_ops(self, model: Model) -> list[dict]:
        """vLLM's worker projects the direction out of the stream itself (the sum) at each point: the embedding,
        then after every attention and every MLP, which is the same as projecting it out of their outputs once the
        stream they add to is orthogonal to it."""
        _check_width(model, self.vector, self.name)
        unit = _unit(self.vector.float()).cpu()
        sites = [("resid_pre", 0)] + [(kind, layer) for layer in range(model.n_layers) for kind in ("attn_out", "mlp_out")]
        return [{"site": site, "layer": layer, "ablate": unit, "first_token": self.first_token}
                for site, layer in sites]


ABLATED_SITES = ("resid_pre", "attn_out", "mlp_out")  # every layer's input and every sublayer's output


@dataclass
class Clamp:
    """Ablate-then-add at `blocks.{layer}.hook_{site}`: h <- h - (h . u) u + alpha u for the unit u of `vector`, on
    the chosen positions, so the projection there is alpha. resid_mid is refused: its write point holds the
    attention output alone, not the stream whose projection would be clamped."""

    vector: Float[Tensor, " d_model"]
    layer: int
    alpha: float = 1.0
    site: str = "resid_post"
    positions: Positions = "all"
    name: str = "clamp"

    def _check(self, model: Model) -> None:
        if self.site == "resid_mid":
            raise EmlensInputError(f"{self.name}: ablate-then-add cannot clamp resid_mid (its write point holds the "
                                   "attention output alone); clamp at resid_pre, resid_post, attn_out or mlp_out")
        _check_site_write(model, self.vector, self.layer, self.site, self.name)

    def attach(self, model: Model, ctx: ForwardContext | None = None) -> contextlib.AbstractContextManager:
        self._check(model)
        ctx = context_of(model) if ctx is None else ctx
        unit = OnDevice(_unit(self.vector.float()).to(dtype=model.dtype))

        def clamp(hidden: Tensor) -> Tensor:
            direction = unit.on(hidden.device)
            change = (self.alpha - hidden @ direction)[..., None] * direction
            mask = position_mask(ctx, self.positions, hidden.shape, hidden.device)
            return hidden + (change if mask is None else mask.to(hidden.dtype) * change)

        return hooked([hook_site(model.base_model, self.layer, self.site, clamp, write=True)])

    def vllm_ops(self, model: Model) -> list[dict]:
        self._check(model)
        return [{"site": self.site, "layer": self.layer, "clamp": _unit(self.vector.float()).cpu(),
                 "alpha": float(self.alpha), "positions": self.positions}]


class Composed:
    """Several interventions entered in order (e.g. ablate, then add)."""

    def __init__(self, *parts, name: str | None = None):
        self.parts = parts
        self.name = name or "+".join(getattr(p, "name", type(p).__name__) for p in parts)

    @contextlib.contextmanager
    def attach(self, model: Model, ctx: ForwardContext | None = None) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for part in self.parts:
                stack.enter_context(part.attach(model, ctx))
            yield

    def vllm_ops(self, model: Model) -> list[dict]:
        ops = []
        for part in self.parts:
            if not hasattr(part, "vllm_ops"):
                raise EmlensInputError(f"intervention '{getattr(part, 'name', part)}' cannot run in the vllm engine")
            ops.extend(part.vllm_ops(model))
        return ops


def compose(*parts, name: str | None = None) -> Composed:
    return Composed(*parts, name=name)


def random_like(vector: Tensor, seed: int = 0) -> Tensor:
    """A random direction with the same norm as `vector` (the control for every steering vector)."""
    generator = torch.Generator().manual_seed(seed)
    random = torch.randn(vector.shape, generator=generator, dtype=torch.float32)
    return (random / random.norm() * vector.float().norm()).to(vector.dtype)


def steer(model: Model, *interventions) -> contextlib.AbstractContextManager:
    """`with steer(model, AddVector(...), Ablate(...)):` every forward pass inside is steered, padding never."""
    return intervene(model, interventions)
