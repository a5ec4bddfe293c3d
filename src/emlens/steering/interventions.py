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

Each intervention is written once, as site-level ops (`ops(model)`, `emlens.generation.ops.SiteOp`): the hf
engine hooks them through `emlens.sites.hook_site` (so `attach` is derived from them), vLLM's worker runs the
same ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from emlens.base.errors import EmlensInputError
from emlens.generation.context import ForwardContext, intervene
from emlens.generation.ops import (  # noqa: F401  (re-exported: the names callers know this module by)
    OnDevice,
    OpIntervention,
    Positions,
    SiteOp,
    first_token_kept,
    hooked,
    ops_of,
    position_mask,
)
from emlens.model import Model
from emlens.sites import SITE_KINDS, check_site_kind


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


class _Forwarded(OpIntervention):
    def vllm_ops(self, model: Model) -> list[SiteOp]:
        """Deprecated: `ops(model)` is the one form every engine runs."""
        return self.ops(model)


@dataclass
class AddVector(_Forwarded):
    """Add alpha * vector at `blocks.{layer}.hook_{site}` on the chosen positions."""

    vector: Float[Tensor, " d_model"]
    layer: int
    alpha: float = 1.0
    site: str = "resid_post"
    positions: Positions = "all"
    name: str = "add"

    def ops(self, model: Model) -> list[SiteOp]:
        _check_site_write(model, self.vector, self.layer, self.site, self.name)
        return [SiteOp("add", self.site, self.layer, self.vector, alpha=self.alpha, positions=self.positions)]


@dataclass
class Ablate(_Forwarded):
    """Project the unit direction out of the residual stream entering every layer and out of every attention and
    MLP output, so no sublayer reads what another wrote along it."""

    vector: Float[Tensor, " d_model"]
    name: str = "ablate"
    first_token: bool = False  # also at each sequence's first token (the attention sink); see the module doc

    def ops(self, model: Model) -> list[SiteOp]:
        _check_width(model, self.vector, self.name)
        unit = _unit(self.vector.float())
        return [SiteOp("ablate", kind, layer, unit, skip_first_token=not self.first_token)
                for layer in range(model.n_layers) for kind in ABLATED_SITES]


ABLATED_SITES = ("resid_pre", "attn_out", "mlp_out")  # every layer's input and every sublayer's output


@dataclass
class Clamp(_Forwarded):
    """Ablate-then-add at `blocks.{layer}.hook_{site}`: h <- h - (h . u) u + alpha u for the unit u of `vector`, on
    the chosen positions, so the projection there is alpha. resid_mid is refused: its write point holds the
    attention output alone, not the stream whose projection would be clamped."""

    vector: Float[Tensor, " d_model"]
    layer: int
    alpha: float = 1.0
    site: str = "resid_post"
    positions: Positions = "all"
    name: str = "clamp"

    def ops(self, model: Model) -> list[SiteOp]:
        if self.site == "resid_mid":
            raise EmlensInputError(f"{self.name}: ablate-then-add cannot clamp resid_mid (its write point holds the "
                                   "attention output alone); clamp at resid_pre, resid_post, attn_out or mlp_out")
        _check_site_write(model, self.vector, self.layer, self.site, self.name)
        return [SiteOp("clamp", self.site, self.layer, _unit(self.vector.float()), alpha=float(self.alpha),
                       positions=self.positions)]


class Composed:
    """Several interventions entered in order (e.g. ablate, then add)."""

    def __init__(self, *parts, name: str | None = None):
        self.parts = parts
        self.name = name or "+".join(getattr(p, "name", type(p).__name__) for p in parts)

    def ops(self, model: Model) -> list[SiteOp] | None:
        """The parts' ops in order; None when a part has none (it hooks the hf model itself)."""
        return ops_of(model, self.parts)

    def vllm_ops(self, model: Model) -> list[SiteOp]:
        """Deprecated: `ops(model)` is the one form every engine runs."""
        ops = self.ops(model)
        if ops is None:
            raise EmlensInputError(f"intervention '{self.name}' cannot run in the vllm engine")
        return ops

    @contextlib.contextmanager
    def attach(self, model: Model, ctx: ForwardContext | None = None) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for part in self.parts:  # each part's own attach: a part may hook the model itself
                stack.enter_context(part.attach(model, ctx))
            yield


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
