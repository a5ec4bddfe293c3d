"""Interventions as engine-neutral programs: site-level ops, and the hf engine's interpreter of them.

An intervention says what it does once, as a list of `SiteOp`s (`intervention.ops(model)`): at a site
(`blocks.{layer}.hook_{site}`) add a vector, project a direction out, clamp a projection, subtract one SAE
latent's contribution, or read the value. Every engine interprets the same ops: the hf engine here, through
`emlens.sites.hook_site` and the position masks of the forward context; vLLM in its worker
(`emlens.generation.vllm_worker`), from the same ops serialised by `vllm_engine`.

Positions. `positions` all / prompt / response picks tokens (response: the tokens that predict an answer
token, the last prompt token included; see `emlens.generation.context`); padding is never touched.
`skip_first_token` also leaves each sequence's first real token alone (the attention sink: its residual is
the same for every prompt and holds a massive activation, so changing it perturbs the sink for any direction).

An intervention built on `OpIntervention` gets its `attach` (the hf form) from its ops, so it is written once.
An object with only `attach` still runs on the hf engine (it has no ops, so no other engine is chosen for it).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from emlens.base.errors import EmlensInputError
from emlens.generation.context import ForwardContext, context_of
from emlens.model import Model
from emlens.sites import hook_site

Positions = Literal["all", "prompt", "response"]
OpKind = Literal["add", "ablate", "clamp", "sae_ablate", "read"]
OP_KINDS = ("add", "ablate", "clamp", "sae_ablate", "read")


@dataclass(frozen=True, eq=False)
class SiteOp:
    """One change (or read) at `blocks.{layer}.hook_{site}`.

    - add: site += alpha * vector on `positions`
    - ablate: site -= (site . vector) vector (vector is unit)
    - clamp: site += (alpha - site . vector) vector (vector is unit): the projection there becomes alpha
    - sae_ablate: site -= f_latent(site) W_dec[latent], f from `sae.encode` (the reconstruction error stays)
    - read: capture the value, pooled by `pool` (last_prompt / mean_response / all) against `prompt_len`
    """

    kind: OpKind
    site: str
    layer: int
    vector: Tensor | None = None
    alpha: float = 1.0
    positions: Positions = "all"
    skip_first_token: bool = False
    sae: Any = None  # sae_ablate: a module with `encode` and `W_dec` (a sae-lens SAE)
    latent: int = 0
    pool: str = "last_prompt"
    prompt_len: int = 0


def ops_of(model: Model, interventions: Iterable[Any]) -> list[SiteOp] | None:
    """Every intervention's ops in order; None when one has none (it hooks the hf model itself)."""
    found: list[SiteOp] = []
    for intervention in interventions:
        make = getattr(intervention, "ops", None)
        ops = make(model) if callable(make) else None
        if ops is None:
            return None
        found.extend(ops)
    return found


class OpIntervention:
    """Base of interventions written as ops: `attach` (hooks on the hf model) is derived from `ops`."""

    def ops(self, model: Model) -> list[SiteOp] | None:
        raise NotImplementedError

    def attach(self, model: Model, ctx: ForwardContext | None = None) -> contextlib.AbstractContextManager:
        ops = self.ops(model)
        if ops is None:
            raise EmlensInputError(f"intervention '{getattr(self, 'name', self)}' has no ops to attach")
        return attach_ops(model, ops, context_of(model) if ctx is None else ctx)


# ---------------------------------------------------------------- position masks


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


def _masked(ctx: ForwardContext, op: SiteOp, hidden: Tensor, change: Tensor, dtype: torch.dtype) -> Tensor:
    """`change` zeroed outside the op's positions (and at first tokens when it skips them)."""
    for mask in (position_mask(ctx, op.positions, hidden.shape, hidden.device),
                 first_token_kept(ctx, hidden) if op.skip_first_token else None):
        if mask is not None:
            change = mask.to(dtype) * change
    return change


# ---------------------------------------------------------------- the hf interpreter


class OnDevice:
    """A value copied once to each device that asks for it (a model sharded across GPUs has layers on several)."""

    def __init__(self, value, copy_to: Callable | None = None, device: torch.device | None = None):
        self.copies = {value.device if device is None else device: value}
        self.copy_to = copy_to or (lambda v, device: v.to(device))

    def on(self, device: torch.device):
        if device not in self.copies:
            self.copies[device] = self.copy_to(next(iter(self.copies.values())), device)
        return self.copies[device]


@contextlib.contextmanager
def hooked(handles) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def attach_ops(model: Model, ops: Sequence[SiteOp], ctx: ForwardContext) -> contextlib.AbstractContextManager:
    """Hook every op onto the hf model (in op order, so hooks sharing a module run in that order)."""
    shared: dict[tuple, OnDevice] = {}  # one device copy per vector or SAE, however many ops use it
    handles = []
    try:
        for op in ops:
            if op.kind == "read":
                raise EmlensInputError("a read op is captured by an engine's `capture`, not attached")
            change = _CHANGES[op.kind](model, op, ctx, shared)
            handles.append(hook_site(model.base_model, op.layer, op.site, change, write=True))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return hooked(handles)


def _shared(shared: dict, key: tuple, build: Callable[[], OnDevice]) -> OnDevice:
    if key not in shared:
        shared[key] = build()
    return shared[key]


def _add(model: Model, op: SiteOp, ctx: ForwardContext, shared: dict):
    delta = _shared(shared, ("add", id(op.vector), op.alpha),
                    lambda: OnDevice((op.alpha * op.vector).to(dtype=model.dtype)))

    def add(hidden: Tensor) -> Tensor:
        return hidden + _masked(ctx, op, hidden, delta.on(hidden.device), hidden.dtype)
    return add


def _unit_on_device(model: Model, op: SiteOp, shared: dict) -> OnDevice:
    return _shared(shared, ("unit", id(op.vector)), lambda: OnDevice(op.vector.to(dtype=model.dtype)))


def _ablate(model: Model, op: SiteOp, ctx: ForwardContext, shared: dict):
    unit = _unit_on_device(model, op, shared)

    def project_out(hidden: Tensor) -> Tensor:
        direction = unit.on(hidden.device)
        removed = (hidden @ direction)[..., None] * direction
        return hidden - _masked(ctx, op, hidden, removed, hidden.dtype)
    return project_out


def _clamp(model: Model, op: SiteOp, ctx: ForwardContext, shared: dict):
    unit = _unit_on_device(model, op, shared)

    def clamp(hidden: Tensor) -> Tensor:
        direction = unit.on(hidden.device)
        change = (op.alpha - hidden @ direction)[..., None] * direction
        return hidden + _masked(ctx, op, hidden, change, hidden.dtype)
    return clamp


def _sae_ablate(model: Model, op: SiteOp, ctx: ForwardContext, shared: dict):
    sae = _shared(shared, ("sae", id(op.sae)),  # a small copy per device the layer runs on
                  lambda: OnDevice(op.sae, lambda module, device: copy.deepcopy(module).to(device),
                                   device=next(op.sae.parameters()).device))
    latent = op.latent

    def remove(hidden: Tensor) -> Tensor:
        module = sae.on(hidden.device)
        activation = module.encode(hidden.float())[..., latent:latent + 1]
        removed = activation * module.W_dec[latent].float()
        return hidden - _masked(ctx, op, hidden, removed, torch.float32).to(hidden.dtype)
    return remove


_CHANGES = {"add": _add, "ablate": _ablate, "clamp": _clamp, "sae_ablate": _sae_ablate}
