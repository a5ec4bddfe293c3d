"""What a request may steer with: the directions and SAEs registered when the server started, nothing else.

A request's `emlens.steer` ops become the interventions `emlens steer` builds for the same numbers
(`Direction.add`: scale x the direction's natural norm at the layer, at the direction's own site; ablate: the
direction projected out of every layer; ablate_then_add: the clamp at the site), so a scale means the same in
both. No path from a request is ever opened: names are looked up in the registry, inline vectors are checked
against the model's width. Equal steering requests get the same intervention objects, so the hf engine batches
them together; the vllm engine batches every request into one pass, each under its own worker program.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from emlens.base.errors import EmlensInputError
from emlens.directions.artifact import Direction
from emlens.model import Model
from emlens.sae.artifact import LoadedSAE, load_sae
from emlens.sae.steer import AblateLatent, check_latent, natural_scale
from emlens.serve.protocol import ServeError, SteerOp
from emlens.steering.interventions import AddVector, Clamp, compose

CACHED_STEERINGS = 256  # distinct steering requests whose interventions are kept for reuse


def parse_named(values: list[str] | None, what: str) -> dict[str, str]:
    """`NAME=PATH` pairs from the command line (a bare PATH is named after its folder)."""
    named: dict[str, str] = {}
    for value in values or []:
        name, _, path = value.rpartition("=") if "=" in value else (Path(value).name, "", value)
        name = name.strip()
        if not name or not path:
            raise EmlensInputError(f"--{what} {value}: expected NAME=PATH")
        if name in named:
            raise EmlensInputError(f"--{what} {value}: the name '{name}' is given twice")
        named[name] = path
    return named


def tensor_digest(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Registered:
    """The directions and SAEs a server was started with, checked against its model."""

    directions: dict[str, Direction] = field(default_factory=dict)
    saes: dict[str, LoadedSAE] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)  # name -> content digest

    @classmethod
    def load(cls, handle: Model, directions: dict[str, str], saes: dict[str, str], force: bool = False) -> Registered:
        """Every artifact loaded and checked now, so a bad one stops the server before it serves (one line)."""
        found = cls()
        for name, path in directions.items():
            direction = Direction.load(path)
            direction.check_compatible(handle, force=force)
            if direction.d_model != handle.d_model:
                raise EmlensInputError(f"--direction {name}={path}: width {direction.d_model} does not match the "
                                       f"model's d_model {handle.d_model}")
            found.directions[name] = direction
            found.fingerprints[name] = tensor_digest(direction.tensors["directions"], direction.tensors["raw_norm"])
        for name, path in saes.items():
            if name in found.directions:
                raise EmlensInputError(f"--sae {name}={path}: the name '{name}' is already a direction")
            loaded = load_sae(path)
            loaded.check_fits(handle)
            found.saes[name] = loaded
            found.fingerprints[name] = tensor_digest(loaded.decoder)
        return found

    def describe(self) -> dict:
        return {"directions": {name: {"fingerprint": self.fingerprints[name], "site": d.site_kind,
                                      "best_layer": d.best_layer, "layers": d.layers, "method": d.method}
                               for name, d in self.directions.items()},
                "saes": {name: {"fingerprint": self.fingerprints[name], "site": s.site_name, "d_sae": s.d_sae}
                         for name, s in self.saes.items()}}


class Steerings:
    """Turns a request's steer ops into interventions and the record of what was applied (memoised)."""

    def __init__(self, handle: Model, registered: Registered):
        self.handle, self.registered = handle, registered
        self._memo: OrderedDict[str, tuple[tuple, list[dict]]] = OrderedDict()

    def resolve(self, ops: list[SteerOp]) -> tuple[tuple, list[dict]]:
        """(interventions, applied): the same tuple object for the same ops, so equal requests batch together."""
        key = "|".join(op.model_dump_json() for op in ops)
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        built = [self._one(op, f"emlens.steer.{i}") for i, op in enumerate(ops)]
        resolved = tuple(b[0] for b in built), [b[1] for b in built]
        self._memo[key] = resolved
        if len(self._memo) > CACHED_STEERINGS:
            self._memo.popitem(last=False)
        return resolved

    def _one(self, op: SteerOp, where: str):
        try:
            if op.direction is not None:
                return self._direction(op, where)
            if op.latent is not None:
                return self._latent(op, where)
            return self._vector(op, where)
        except EmlensInputError as error:
            raise ServeError(str(error), param=where) from None

    def _direction(self, op: SteerOp, where: str):
        direction = self.registered.directions.get(op.direction)
        if direction is None:
            known = ", ".join(self.registered.directions) or "none registered"
            raise ServeError(f"direction '{op.direction}' is not registered (known: {known})", f"{where}.direction")
        if op.layer is not None and op.layer not in direction.layers:
            raise ServeError(f"direction '{op.direction}' has no layer {op.layer} (layers {direction.layers[0]}-"
                             f"{direction.layers[-1]})", f"{where}.layer")
        layer = direction.best_layer if op.layer is None else op.layer
        alpha = op.scale * direction.raw_norm(layer)
        if op.op == "add":
            intervention = direction.add(op.scale, layer, positions=op.positions)
        elif op.op == "ablate":
            intervention = direction.ablate(layer)
        else:
            intervention = Clamp(direction.vector(layer), layer, alpha, site=direction.site_kind,
                                 positions=op.positions)
        applied = {"op": op.op, "direction": op.direction, "fingerprint": self.registered.fingerprints[op.direction],
                   "layer": layer, "site": direction.site_kind, "scale": op.scale,
                   "alpha": 0.0 if op.op == "ablate" else alpha, "positions": op.positions}
        return intervention, applied

    def _latent(self, op: SteerOp, where: str):
        name = op.sae or (next(iter(self.registered.saes)) if len(self.registered.saes) == 1 else None)
        loaded = self.registered.saes.get(name) if name else None
        if loaded is None:
            known = ", ".join(self.registered.saes) or "none registered"
            raise ServeError(f"SAE '{op.sae}' is not registered (known: {known})" if op.sae else
                             f"name the SAE of the latent (registered: {known})", f"{where}.sae")
        site = loaded.site(self.handle.n_layers)
        if op.layer not in (None, site.layer):
            raise ServeError(f"a latent of SAE '{name}' steers at its site {site.name}; leave out layer",
                             f"{where}.layer")
        latent = check_latent(loaded, op.latent)
        alpha = op.scale * natural_scale(loaded, latent)
        unit = loaded.decoder[latent] / loaded.decoder[latent].norm()
        add = AddVector(unit, site.layer, alpha, site=site.kind, positions=op.positions)
        ablation = AblateLatent(loaded, latent)
        intervention = {"add": add, "ablate": ablation, "ablate_then_add": compose(ablation, add)}[op.op]
        applied = {"op": op.op, "sae": name, "latent": latent, "fingerprint": self.registered.fingerprints[name],
                   "layer": site.layer, "site": site.kind, "scale": op.scale,
                   "alpha": 0.0 if op.op == "ablate" else alpha, "positions": op.positions}
        return intervention, applied

    def _vector(self, op: SteerOp, where: str):
        vector = torch.tensor(op.vector, dtype=torch.float32)
        if vector.shape[0] != self.handle.d_model:
            raise ServeError(f"inline vector of width {vector.shape[0]} does not match the model's d_model "
                             f"{self.handle.d_model}", f"{where}.vector")
        if op.layer >= self.handle.n_layers:
            raise ServeError(f"layer {op.layer} out of range (model has {self.handle.n_layers} layers)",
                             f"{where}.layer")
        if op.op != "add":
            raise ServeError("an inline vector is only added (op add): ablation needs a registered direction",
                             f"{where}.op")
        norm = float(vector.norm())
        if norm == 0:
            raise ServeError("inline vector is zero", f"{where}.vector")
        # an inline vector has no natural norm: scale multiplies the vector as given (alpha: the added norm)
        intervention = AddVector(vector, op.layer, op.scale, site="resid_post", positions=op.positions)
        applied = {"op": "add", "vector": tensor_digest(vector), "fingerprint": tensor_digest(vector),
                   "layer": op.layer, "site": "resid_post", "scale": op.scale, "alpha": op.scale * norm,
                   "positions": op.positions}
        return intervention, applied
