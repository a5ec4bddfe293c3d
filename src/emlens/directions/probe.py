"""`emlens probe fit`: a spec's data, extracted and fitted per layer, into a direction artifact."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from emlens.base.errors import EmlensInputError
from emlens.base.io import check_writable_folder, file_sha256, versions
from emlens.capture.extract import extract_to_store
from emlens.capture.items import items_hash
from emlens.capture.store import ActivationStore
from emlens.directions.artifact import (
    Direction,
)
from emlens.directions.fit import ARTIFACT_CLASS
from emlens.directions.fitting import best_layer_metrics, fit_sites, nested_selection
from emlens.directions.lens import lens_record
from emlens.directions.probe_data import ProbeData, contrast_data, score_data
from emlens.directions.specs import Contrast, ProbeSpec, SpecContext, load_spec
from emlens.model import Model
from emlens.sites import resolve_sites

# bump when a change alters what a fitted direction or probe holds: `emlens run` then redoes its finished stages
RESULTS_VERSION = 4  # 2: the best layer's nested-CV metric; 3: each layer's shuffled-label null; 4: its lens tokens


def fit_store(store: ActivationStore, data: ProbeData, spec: ProbeSpec, sites: list, progress: bool = True
              ) -> tuple[dict[str, np.ndarray], pd.DataFrame, dict]:
    """Fit every site of the store; returns stacked tensors (layers first), the per-layer metrics table and the
    nested-CV estimate of the best layer's metric."""
    rows = store.vector_rows().numpy()
    acts = {site.name: store.load(site.name).double().numpy() for site in sites}
    fitted = (acts, data.y[rows], data.groups[rows], data.pairs[rows], spec.method, spec.folds, spec.regularization,
              spec.seed)
    return (*fit_sites(*fitted, progress), nested_selection(*fitted))


# ---------------------------------------------------------------- the whole command


def _store_matches(store: ActivationStore, handle: Model, data_hash: str, spec: ProbeSpec, sites: list) -> list[str]:
    manifest, changed = store.manifest, []
    if manifest.get("model", {}).get("fingerprint") != handle.fingerprint:
        changed.append("model fingerprint")
    if manifest.get("data_hash") != data_hash:
        changed.append("data")
    if manifest.get("position") != spec.position:
        changed.append("position")
    if manifest.get("max_response_tokens") != spec.max_response_tokens:
        changed.append("max_response_tokens")
    if not {s.name for s in sites} <= set(store.sites):
        changed.append("sites")
    return changed


def default_out(spec: ProbeSpec, handle: Model) -> Path:
    return Path("artifacts") / "directions" / f"{spec.name}-{handle.fingerprint[:8]}"


def fit_probe(spec_path: str | Path, handle: Model, out: str | Path | None = None, store: str | Path | None = None,
              table: str | None = None, limit: int | None = None, data_root: str | Path | None = None,
              backend: str | None = None, progress: bool = True, force: bool = False) -> Direction:
    """`emlens probe fit`: build the spec's rows, extract (or reuse `store`), fit every layer, save the artifact."""
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    spec = _override_table(spec, table, spec_path)
    ctx = SpecContext(spec_path, Path(data_root) if data_root else None)
    sites = resolve_sites(spec.site, handle.n_layers, spec.layers)
    if len({s.kind for s in sites}) != 1:
        raise EmlensInputError(f"{spec_path} field 'site': a direction artifact holds one site kind per layer "
                               f"(got {sorted({s.kind for s in sites})})")
    backend = backend or spec.backend
    data = contrast_data(spec, ctx, limit) if spec.contrast else score_data(spec, ctx, handle, limit, progress)
    data_hash = items_hash(data.items)
    kind = ARTIFACT_CLASS.get(spec.method, Direction)
    out = check_writable_folder(Path(out) if out else default_out(spec, handle), kind.KIND, force)

    reuse = store is not None and Path(store).exists() and any(Path(store).iterdir())
    if reuse:
        activations = ActivationStore(store)
        changed = _store_matches(activations, handle, data_hash, spec, sites)
        if changed:
            raise EmlensInputError(f"{store}: store holds other activations (differs in {', '.join(changed)}); "
                                   "use a new --store folder or delete this one")
    # Without --store the activations live in a temporary folder, removed whatever happens.
    tmp_store = None if store is not None else Path(tempfile.mkdtemp(prefix="emlens-store-"))
    try:
        if not reuse:
            activations = extract_to_store(handle, data.items, Path(store) if store else tmp_store / "store", sites,
                                           spec.position, backend, spec.batch_size, spec.max_response_tokens,
                                           manifest={"spec": spec.name}, progress=progress)
        tensors, metrics, nested = fit_store(activations, data, spec, sites, progress)
    finally:
        if tmp_store is not None:
            shutil.rmtree(tmp_store, ignore_errors=True)
    cfg = _provenance(spec, spec_path, handle, sites, backend, data, data_hash, metrics, nested, limit, table)
    artifact = kind({k: torch.as_tensor(v, dtype=torch.long if k == "layers" else torch.float32)
                     for k, v in tensors.items()}, cfg, metrics=metrics)
    artifact.cfg.lens = lens_record(handle, artifact.vector(), artifact.best_layer)  # what it writes, in tokens
    artifact.save(out, force=force)
    return artifact


def _override_table(spec: ProbeSpec, table: str | None, spec_path: Path) -> ProbeSpec:
    """`--table`: every table source (and a score's table or rating) reads this table instead."""
    if table is None:
        return spec
    table = str(Path(table).resolve())
    if spec.score is not None:
        return spec.model_copy(update={"score": spec.score.model_copy(update={"table": table, "rate": None})})
    sides = {side: spec.contrast.side(side) for side in ("positive", "negative")}
    if not any(s.table is not None for side in sides.values() for s in side):
        raise EmlensInputError(f"{spec_path}: --table given but the spec reads no table")
    sides = {k: [s.model_copy(update={"table": table}) if s.table is not None else s for s in side]
             for k, side in sides.items()}
    return spec.model_copy(update={"contrast": Contrast(**sides)})


def _provenance(spec: ProbeSpec, spec_path: Path, handle: Model, sites, backend: str, data: ProbeData, data_hash: str,
                metrics: pd.DataFrame, nested: dict, limit: int | None, table: str | None) -> dict:
    best, best_metrics = best_layer_metrics(metrics, nested)
    return {
        "name": spec.name, "description": spec.description, "method": spec.method,
        "site_kind": sites[0].kind, "sites": [s.name for s in sites], "layers": [s.layer for s in sites],
        "position": spec.position, "backend": backend, "normalized": True,
        "raw_norm_meaning": ("norm of the activation shift per standard deviation of the score" if spec.method == "ridge"
                             else "norm of mean(positive) - mean(negative)"),
        "best_layer": best, "best_metrics": best_metrics,
        "model": handle.describe(),
        "data": {"hash": data_hash, "n": len(data.y), "n_positive": data.n_positive if spec.contrast else None,
                 "n_negative": data.n_negative if spec.contrast else None,
                 "n_groups": int(len(np.unique(data.groups))), "sources": data.sources, "limit": limit,
                 "table_override": table, "max_response_tokens": spec.max_response_tokens},
        "seed": spec.seed, "folds": spec.folds, "regularization": spec.regularization,
        "spec": spec.model_dump(), "spec_file": str(spec_path), "spec_sha256": file_sha256(spec_path),
        "metrics": metrics.to_dict("records"), "versions": versions(), "emlens_version": versions()["emlens"],
        "created": time.time(),
    }
