"""Direction and probe artifacts: a folder with `weights.safetensors` + `cfg.json`, SAELens-style.

    ARTIFACT/
      weights.safetensors   directions (layers, d_model) UNIT vectors, layers (layers,), raw_norm (layers,),
                            and per kind: mean_positive/mean_negative, coef/intercept (probes)
      cfg.json              kind, method, site kind, layers, position policy, best layer, model + base
                            fingerprints, data hash and sources, counts, metrics, seed, emlens version
      metrics.parquet       one row per layer (held-out AUROC/accuracy or R^2, raw norm, ...)
      metrics.png           the same, drawn

`raw_norm[l]` is the norm of the class-mean difference at layer l (for ridge: the norm of the activation
change of one standard deviation of the score): the natural scale for steering with `vector(l) * raw_norm(l)`.

    d = Direction.load("artifacts/directions/refusal")
    d.vector(d.best_layer)       # Tensor[d_model], unit norm
    d.check_compatible(handle)   # one-line error for another width or base model, unless force=True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch
from jaxtyping import Float
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import Tensor

from emlens.base.errors import EmlensInputError
from emlens.base.io import (
    CFG_FILE,
    FORMAT_VERSION,
    METRICS_FILE,
    WEIGHTS_FILE,
    artifact_kind,
    atomic_folder,
    atomic_write_table,
    atomic_write_text,
    register_artifact,
    save_figure,
    validate,
)
from emlens.model import Model
from emlens.sites import site_name
from emlens.steering.interventions import Ablate, AddVector, Positions

_KINDS: dict[str, type[Direction]] = {}


class DirectionConfig(BaseModel):
    """cfg.json of a direction or probe: what it is, where it was read, and its provenance.

    Fields beyond these (sources, spec, per-layer metrics, ...) are kept as they are.
    """

    model_config = ConfigDict(extra="allow")

    kind: str = "direction"
    format_version: int = FORMAT_VERSION
    name: str = "direction"
    description: str = ""
    method: str = ""
    site_kind: str
    layers: list[int]
    best_layer: int
    position: str | None = None
    model: dict[str, Any] = Field(default_factory=dict)  # Model.describe() of the model it was read from
    data: dict[str, Any] = Field(default_factory=dict)  # hash, counts, sources
    best_metrics: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None


def register_kind(kind: str):
    """Class decorator: artifacts whose cfg says `kind` load as this class (and open with `em.load`)."""
    def decorate(cls):
        cls.KIND = kind
        _KINDS[kind] = cls
        register_artifact(kind, whole=True)(cls.load)  # saved by atomic_folder
        return cls
    return decorate


def artifact_kinds() -> list[str]:
    return sorted(_KINDS)


@register_kind("direction")
class Direction:
    """One direction per layer for one site kind (diff of means, PCA of paired differences)."""

    KIND: ClassVar[str] = "direction"

    def __init__(self, tensors: dict[str, Tensor], cfg: DirectionConfig | dict, metrics: pd.DataFrame | None = None,
                 path: Path | None = None):
        cfg = validate(DirectionConfig, dict(cfg) if isinstance(cfg, dict) else cfg.model_dump(),
                       path / CFG_FILE if path else "direction cfg")
        directions = tensors["directions"]
        if directions.ndim != 2 or directions.shape[0] != len(cfg.layers):
            raise EmlensInputError(f"{path or 'direction'}: directions of shape {tuple(directions.shape)} do not "
                                   f"match {len(cfg.layers)} layers in cfg.json")
        self.tensors = {k: v.detach().to("cpu") for k, v in tensors.items()}
        self.cfg = cfg.model_copy(update={"kind": self.KIND})
        self._metrics = metrics
        self.path = path

    # ------------------------------------------------------------ reading

    @property
    def layers(self) -> list[int]:
        return list(self.cfg.layers)

    @property
    def best_layer(self) -> int:
        return self.cfg.best_layer

    @property
    def d_model(self) -> int:
        return int(self.tensors["directions"].shape[1])

    @property
    def site_kind(self) -> str:
        return self.cfg.site_kind

    @property
    def method(self) -> str:
        return self.cfg.method

    @property
    def name(self) -> str:
        return self.cfg.name if self.cfg.name != "direction" or self.path is None else self.path.name

    def _row(self, layer: int | None) -> int:
        layer = self.best_layer if layer is None else int(layer)
        if layer not in self.layers:
            raise EmlensInputError(f"{self.path or self.name}: no direction for layer {layer} "
                                   f"(layers: {_span(self.layers)})")
        return self.layers.index(layer)

    def vector(self, layer: int | None = None) -> Float[Tensor, " d_model"]:
        """The unit direction at `layer` (default: the best layer)."""
        return self.tensors["directions"][self._row(layer)].clone()

    def raw_norm(self, layer: int | None = None) -> float:
        """The natural scale at `layer`: norm of the class-mean difference (or of one score SD for ridge)."""
        return float(self.tensors["raw_norm"][self._row(layer)])

    def site(self, layer: int | None = None) -> str:
        return site_name(self.best_layer if layer is None else int(layer), self.site_kind)

    def metrics(self) -> pd.DataFrame:
        if self._metrics is None and self.path is not None and (self.path / METRICS_FILE).exists():
            self._metrics = pd.read_parquet(self.path / METRICS_FILE)
        return self._metrics if self._metrics is not None else pd.DataFrame(getattr(self.cfg, "metrics", []))

    def project(self, acts: Float[Tensor, "n d_model"], layer: int | None = None) -> Float[Tensor, " n"]:
        """Scalar projections of activations onto the unit direction at `layer`."""
        return acts.float() @ self.vector(layer)

    # ------------------------------------------------------------ steering

    def steering_site(self, site: str | None = None, force: bool = False) -> str:
        """The site kind to steer at: the direction's own, unless told otherwise with force (a mismatch is an
        error: a direction read at mlp_out means something else in resid_post)."""
        if site is None or site == self.site_kind:
            return self.site_kind
        if not force:
            raise EmlensInputError(f"{self.path or self.name}: fitted at hook_{self.site_kind}, asked to steer at "
                                   f"hook_{site}; steer at its own site, or pass force=True to steer elsewhere")
        return site

    def add(self, scale: float = 1.0, layer: int | None = None, site: str | None = None,
            positions: Positions = "all", absolute: bool = False, force: bool = False) -> AddVector:
        """Steering: add `scale` x the natural norm (raw_norm) of the direction at `layer` (default: best).

        `absolute=True` makes `scale` the norm of the added vector itself.
        """
        norm = 1.0 if absolute else self.raw_norm(layer)
        layer = self.best_layer if layer is None else int(layer)
        return AddVector(self.vector(layer), layer, alpha=scale * norm, site=self.steering_site(site, force),
                         positions=positions, name=f"{self.name}+{scale:g}@{layer}")

    def ablate(self, layer: int | None = None, first_token: bool = False) -> Ablate:
        """Directional ablation of the direction at `layer` (default: best) from every layer's residual stream."""
        return Ablate(self.vector(layer), name=f"{self.name}-ablate", first_token=first_token)

    def random_control(self, seed: int = 0) -> Direction:
        """The same artifact with every layer's direction replaced by a random unit vector (same natural norms):
        the control to run beside every steering or monitoring result."""
        generator = torch.Generator().manual_seed(seed)
        random = torch.randn(self.tensors["directions"].shape, generator=generator)
        tensors = {**self.tensors, "directions": random / random.norm(dim=1, keepdim=True)}
        cfg = self.cfg.model_copy(update={"name": f"{self.name}-random{seed}", "random_control_of": self.name})
        return Direction({k: v for k, v in tensors.items() if k in ("directions", "raw_norm", "layers")}, cfg)

    # ------------------------------------------------------------ compatibility

    def check_compatible(self, handle: Model, force: bool = False) -> None:
        """Raise a one-line error when `handle` has another width, depth or base model (unless force)."""
        model = self.cfg.model
        where = self.path or self.name
        if handle.d_model != self.d_model:
            raise EmlensInputError(f"{where}: direction width {self.d_model} does not match the model's d_model "
                                   f"{handle.d_model} (another model family)")  # never forceable: shapes differ
        if max(self.layers) >= handle.n_layers:
            raise EmlensInputError(f"{where}: direction has layer {max(self.layers)} but the model has "
                                   f"{handle.n_layers} layers")
        base = model.get("base_fingerprint")
        if base and base != handle.base_fingerprint and not force:
            raise EmlensInputError(f"{where}: fitted on base model {model.get('model')} (base fingerprint {base}), "
                                   f"not on {handle.spec} (base fingerprint {handle.base_fingerprint}); "
                                   "pass force=True (--force) to use it anyway")

    # ------------------------------------------------------------ saving and loading

    def save(self, path: str | Path, plot: bool = True, force: bool = False) -> Path:
        """Write the artifact folder atomically; it may replace only an earlier direction artifact (or `force`)."""
        path = Path(path)
        found = artifact_kind(path)
        kind = found if found in _KINDS else self.KIND  # a probe may replace a direction of the same name
        with atomic_folder(path, kind, force=force) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp / WEIGHTS_FILE))
            atomic_write_text(tmp / CFG_FILE, json.dumps(self.cfg.model_dump(), indent=2, default=_jsonable))
            metrics = self.metrics()
            if not metrics.empty:
                atomic_write_table(metrics, tmp / METRICS_FILE)
                if plot:
                    plot_metrics(metrics, tmp / "metrics.png", title=self.name, best_layer=self.best_layer)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        """Load any registered kind (`Direction.load` returns a LinearProbe for a probe folder)."""
        path = Path(path)
        cfg_path, weights_path = path / CFG_FILE, path / WEIGHTS_FILE
        if not cfg_path.exists() or not weights_path.exists():
            raise EmlensInputError(f"{path}: not a direction artifact (needs cfg.json and weights.safetensors)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise EmlensInputError(f"{cfg_path} line {e.lineno}: invalid JSON ({e.msg})") from None
        kind = cfg.get("kind", "direction")
        if kind not in _KINDS:
            raise EmlensInputError(f"{cfg_path}: unknown kind '{kind}' (known: {', '.join(artifact_kinds())})")
        target = _KINDS[kind]
        if not issubclass(target, cls):
            raise EmlensInputError(f"{cfg_path}: a '{kind}' artifact, not a {cls.KIND}")
        return target(load_file(str(weights_path)), cfg, path=path)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, method={self.method}, site=blocks.*.hook_{self.site_kind}, "
                f"layers={_span(self.layers)}, best_layer={self.best_layer}, d_model={self.d_model})")


@register_kind("linear_probe")
class LinearProbe(Direction):
    """A logistic-regression probe per layer: `coef` (layers, d_model) and `intercept` (layers,) in raw
    activation space (standardisation folded in); `directions` is coef normalised."""

    def logits(self, acts: Float[Tensor, "n d_model"], layer: int | None = None) -> Float[Tensor, " n"]:
        row = self._row(layer)
        return acts.float() @ self.tensors["coef"][row] + self.tensors["intercept"][row]

    def predict_proba(self, acts: Float[Tensor, "n d_model"], layer: int | None = None) -> Float[Tensor, " n"]:
        return torch.sigmoid(self.logits(acts, layer))


@register_kind("regression_probe")
class RegressionProbe(Direction):
    """A ridge regression per layer onto a score: `coef` and `intercept` in raw activation space."""

    def predict(self, acts: Float[Tensor, "n d_model"], layer: int | None = None) -> Float[Tensor, " n"]:
        row = self._row(layer)
        return acts.float() @ self.tensors["coef"][row] + self.tensors["intercept"][row]


# ---------------------------------------------------------------- helpers


def _span(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def _jsonable(value: Any):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def plot_metrics(metrics: pd.DataFrame, out: Path, title: str = "", best_layer: int | None = None) -> Path:
    """Held-out metric(s) per layer (left axis) and the raw direction norm (right axis)."""

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for column, style in (("auroc", "o-"), ("accuracy", "s--"), ("r2", "o-"), ("pearson_r", "s--")):
        if column in metrics and metrics[column].notna().any():
            ax.plot(metrics["layer"], metrics[column], style, ms=3, label=f"held-out {column}")
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out metric")
    ax.grid(alpha=0.3)
    if best_layer is not None:
        ax.axvline(best_layer, color="grey", ls=":", label=f"best layer {best_layer}")
    if "raw_norm" in metrics:
        twin = ax.twinx()
        twin.plot(metrics["layer"], metrics["raw_norm"], color="tab:red", alpha=0.5, lw=1)
        twin.set_ylabel("raw norm", color="tab:red")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out
