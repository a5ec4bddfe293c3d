"""Interventions on the residual stream, as context managers the generation engine enters.

- `AddVector`: h <- h + alpha * v at one site, on prompt tokens, response tokens or both (never padding).
- `Ablate`: directional ablation, h <- h - (h . v) v for unit v, at the input of every decoder layer and at the
  last layer's output, so no layer reads or writes the direction (Arditi et al. 2024). Not at a sequence's
  first token unless asked: in a causal LM its residual is the same for every prompt, so it carries nothing
  about the prompt, and it holds the attention sink's massive activation (SmolLM2-135M, layer 15: |x| = 25,054,
  against about 170 elsewhere), so projecting there perturbs the sink for any direction, random ones included.
- `compose(...)`: several at once (ablate-then-add is `[Ablate(v), AddVector(v, ...)]`).
- `random_like(v)`: a random vector of the same norm, the control beside every steering run.

Each intervention has `attach(handle, ctx)`, a context manager whose hooks are removed on exit; `ctx` is the
engine's ForwardContext, whose per-row token masks decide which positions are steered. Outside the engine
(`ctx` None or unset) every position is steered.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from .errors import EmlensInputError

Positions = Literal["all", "prompt", "response"]
SITE_KINDS = ("resid_pre", "resid_post")


def _position_mask(ctx, positions: Positions, shape: torch.Size, device) -> Tensor | None:
    """(batch, pos, 1) float mask of the positions to change in this forward pass; None means all of them."""
    if ctx is None or ctx.prompt_mask is None:
        return None
    if tuple(ctx.prompt_mask.shape) != tuple(shape[:2]):
        return None  # a forward pass the engine did not describe (e.g. a user call): steer everything
    if positions == "prompt":
        mask = ctx.prompt_mask
    elif positions == "response":
        mask = ctx.response_mask
    else:
        mask = ctx.prompt_mask | ctx.response_mask
    return mask.to(device=device, dtype=torch.float32)[..., None]


def _first_token_kept(ctx, hidden: Tensor) -> Tensor | None:
    """(batch, pos, 1) mask that is 0 at each sequence's first (non-padding) token; None when it is not here.

    In the engine the prompt mask finds it under left padding, and decode steps never hold it. Outside the
    engine position 0 of any multi-token forward is taken as the first token.
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


def _unit(v: Tensor) -> Tensor:
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise EmlensInputError("steering vector has zero or non-finite norm")
    return v / norm


def _check_width(handle, v: Tensor, what: str) -> None:
    if v.ndim != 1 or v.shape[0] != handle.d_model:
        raise EmlensInputError(f"{what}: vector of shape {tuple(v.shape)} does not match the model's d_model "
                               f"{handle.d_model}")


def _check_layer(handle, layer: int, what: str) -> None:
    if not 0 <= layer < handle.n_layers:
        raise EmlensInputError(f"{what}: layer {layer} out of range (model has {handle.n_layers} layers)")


@dataclass
class AddVector:
    """Add alpha * vector at `blocks.{layer}.hook_{site}` on the chosen positions."""

    vector: Float[Tensor, " d_model"]
    layer: int
    alpha: float = 1.0
    site: str = "resid_post"
    positions: Positions = "all"
    name: str = "add"

    def attach(self, handle, ctx=None) -> contextlib.AbstractContextManager:
        _check_width(handle, self.vector, self.name)
        _check_layer(handle, self.layer, self.name)
        if self.site not in SITE_KINDS:
            raise EmlensInputError(f"{self.name}: site '{self.site}' not steerable (use {' or '.join(SITE_KINDS)})")
        return self._attached(handle, ctx)

    @contextlib.contextmanager
    def _attached(self, handle, ctx) -> Iterator[None]:
        module = handle.decoder_layers[self.layer]
        delta = (self.alpha * self.vector).to(device=handle.device, dtype=handle.dtype)

        def add(hidden: Tensor) -> Tensor:
            mask = _position_mask(ctx, self.positions, hidden.shape, hidden.device)
            return hidden + (delta if mask is None else mask.to(hidden.dtype) * delta)

        if self.site == "resid_post":
            hook = module.register_forward_hook(lambda m, args, out: _replace_output(out, add))
        else:
            hook = module.register_forward_pre_hook(lambda m, args, kwargs: _replace_input(args, kwargs, add),
                                                    with_kwargs=True)
        try:
            yield
        finally:
            hook.remove()


@dataclass
class Ablate:
    """Project the unit direction out of the residual stream entering every layer and leaving the last one."""

    vector: Float[Tensor, " d_model"]
    name: str = "ablate"
    first_token: bool = False  # also at each sequence's first token (the attention sink); see the module doc

    def attach(self, handle, ctx=None) -> contextlib.AbstractContextManager:
        _check_width(handle, self.vector, self.name)
        return self._attached(handle, ctx)

    @contextlib.contextmanager
    def _attached(self, handle, ctx) -> Iterator[None]:
        unit = _unit(self.vector.float()).to(device=handle.device, dtype=handle.dtype)

        def project_out(hidden: Tensor) -> Tensor:
            removed = (hidden @ unit)[..., None] * unit
            for mask in (_position_mask(ctx, "all", hidden.shape, hidden.device),
                         None if self.first_token else _first_token_kept(ctx, hidden)):
                if mask is not None:
                    removed = mask.to(hidden.dtype) * removed
            return hidden - removed

        hooks = [layer.register_forward_pre_hook(lambda m, args, kwargs: _replace_input(args, kwargs, project_out),
                                                 with_kwargs=True) for layer in handle.decoder_layers]
        hooks.append(handle.decoder_layers[-1].register_forward_hook(
            lambda m, args, out: _replace_output(out, project_out)))
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()


class Composed:
    """Several interventions entered in order (e.g. ablate, then add)."""

    def __init__(self, *parts, name: str | None = None):
        self.parts = parts
        self.name = name or "+".join(getattr(p, "name", type(p).__name__) for p in parts)

    @contextlib.contextmanager
    def attach(self, handle, ctx=None) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for part in self.parts:
                stack.enter_context(part.attach(handle, ctx))
            yield


def compose(*parts, name: str | None = None) -> Composed:
    return Composed(*parts, name=name)


def random_like(vector: Tensor, seed: int = 0) -> Tensor:
    """A random direction with the same norm as `vector` (the control for every steering vector)."""
    generator = torch.Generator().manual_seed(seed)
    random = torch.randn(vector.shape, generator=generator, dtype=torch.float32)
    return (random / random.norm() * vector.float().norm()).to(vector.dtype)


@contextlib.contextmanager
def steer(handle, *interventions) -> Iterator[None]:
    """Use interventions outside the engine (a plain forward or HF generate): every position is steered."""
    with contextlib.ExitStack() as stack:
        for intervention in interventions:
            stack.enter_context(intervention.attach(handle, None))
        yield


def _replace_output(output, change):
    # transformers 5.x decoder layers return a Tensor; older versions a tuple whose first item is the stream
    if isinstance(output, tuple):
        return (change(output[0]), *output[1:])
    return change(output)


def _replace_input(args, kwargs, change):
    if args:
        return (change(args[0]), *args[1:]), kwargs
    key = "hidden_states"
    return args, {**kwargs, key: change(kwargs[key])}


# ---------------------------------------------------------------- weight-space ablation

RESIDUAL_WRITERS = ("o_proj", "down_proj", "c_proj", "out_proj", "dense_4h_to_h", "fc2", "w2")


def ablate_adapter_weights(adapter, vector: Tensor, out, force: bool = False) -> "Path":
    """Project the unit direction out of the LoRA B matrices that write into the residual stream.

    For modules whose output is the residual stream (o_proj, down_proj, ...), B <- B - u (u^T B), so the
    adapter can no longer write along u (the model-organisms weight ablation). Other LoRA matrices are copied.
    """
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from .models import resolve_adapter

    source = resolve_adapter(str(adapter))
    weights = load_file(source / "adapter_model.safetensors")
    unit = _unit(vector.float())
    changed = []
    for key, tensor in weights.items():
        if "lora_B" in key and any(f".{name}." in key for name in RESIDUAL_WRITERS):
            if tensor.shape[0] != unit.shape[0]:
                raise EmlensInputError(f"{source}: {key} writes {tensor.shape[0]} dims, direction has {unit.shape[0]}")
            weights[key] = (tensor.float() - torch.outer(unit, unit @ tensor.float())).to(tensor.dtype)
            changed.append(key)
    if not changed and not force:
        raise EmlensInputError(f"{source}: no LoRA B matrix writes into the residual stream "
                               f"(targets none of {', '.join(RESIDUAL_WRITERS)})")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    save_file(weights, tmp / "adapter_model.safetensors")
    (tmp / "weight_ablation.json").write_text(json.dumps({"source": str(source), "ablated": changed}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
