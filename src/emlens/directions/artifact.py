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
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from emlens.base.errors import EmlensInputError
from emlens.base.io import atomic_write_table
from emlens.sites import site_name

FORMAT_VERSION = 1
_KINDS: dict[str, type[Direction]] = {}


def register_kind(kind: str):
    """Class decorator: artifacts whose cfg says `kind` load as this class."""
    def decorate(cls):
        cls.KIND = kind
        _KINDS[kind] = cls
        return cls
    return decorate


def artifact_kinds() -> list[str]:
    return sorted(_KINDS)


@register_kind("direction")
class Direction:
    """One direction per layer for one site kind (diff of means, PCA of paired differences)."""

    KIND: ClassVar[str] = "direction"

    def __init__(self, tensors: dict[str, Tensor], cfg: dict, metrics: pd.DataFrame | None = None,
                 path: Path | None = None):
        directions = tensors["directions"]
        if directions.ndim != 2 or directions.shape[0] != len(cfg["layers"]):
            raise EmlensInputError(f"{path or 'direction'}: directions of shape {tuple(directions.shape)} do not "
                                   f"match {len(cfg['layers'])} layers in cfg.json")
        self.tensors = {k: v.detach().to("cpu") for k, v in tensors.items()}
        self.cfg = {**cfg, "kind": self.KIND}
        self._metrics = metrics
        self.path = path

    # ------------------------------------------------------------ reading

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.cfg["layers"]]

    @property
    def best_layer(self) -> int:
        return int(self.cfg["best_layer"])

    @property
    def d_model(self) -> int:
        return int(self.tensors["directions"].shape[1])

    @property
    def site_kind(self) -> str:
        return self.cfg["site_kind"]

    @property
    def method(self) -> str:
        return self.cfg.get("method", "")

    @property
    def name(self) -> str:
        return self.cfg.get("name") or (self.path.name if self.path else "direction")

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
        if self._metrics is None and self.path is not None and (self.path / "metrics.parquet").exists():
            self._metrics = pd.read_parquet(self.path / "metrics.parquet")
        return self._metrics if self._metrics is not None else pd.DataFrame(self.cfg.get("metrics", []))

    def project(self, acts: Float[Tensor, "n d_model"], layer: int | None = None) -> Float[Tensor, " n"]:
        """Scalar projections of activations onto the unit direction at `layer`."""
        return acts.float() @ self.vector(layer)

    # ------------------------------------------------------------ compatibility

    def check_compatible(self, handle, force: bool = False) -> None:
        """Raise a one-line error when `handle` has another width, depth or base model (unless force)."""
        model = self.cfg.get("model", {})
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

    def save(self, path: str | Path, plot: bool = True) -> Path:
        """Write the artifact folder atomically (a half-written folder never replaces a good one)."""
        from safetensors.torch import save_file


        path = check_artifact_target(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished folder is not
        try:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp / "weights.safetensors"))
            cfg = {**self.cfg, "format_version": FORMAT_VERSION}
            (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2, default=_jsonable))
            metrics = self.metrics()
            if not metrics.empty:
                atomic_write_table(metrics, tmp / "metrics.parquet")
                if plot:
                    plot_metrics(metrics, tmp / "metrics.png", title=self.name, best_layer=self.best_layer)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        """Load any registered kind (`Direction.load` returns a LinearProbe for a probe folder)."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path, weights_path = path / "cfg.json", path / "weights.safetensors"
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
        for key in ("layers", "best_layer", "site_kind"):
            if key not in cfg:
                raise EmlensInputError(f"{cfg_path}: missing field '{key}'")
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


def check_artifact_target(path: str | Path) -> Path:
    """An artifact may replace an older artifact or an empty folder, never anything else."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / "cfg.json").exists())):
        raise EmlensInputError(f"{path}: exists and is not a direction artifact (refusing to replace it)")
    return path


def load_direction(path: str | Path) -> Direction:
    return Direction.load(path)


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
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
