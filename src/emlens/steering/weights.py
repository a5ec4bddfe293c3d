"""Weight-space ablation: project a direction out of the LoRA matrices that write into the residual stream."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from emlens.base.errors import EmlensInputError
from emlens.base.io import (
    CFG_FILE,
    FORMAT_VERSION,
    atomic_folder,
    atomic_write_json,
    read_json,
    register_artifact,
    versions,
)
from emlens.model import resolve_adapter
from emlens.steering.interventions import _unit

# ---------------------------------------------------------------- weight-space ablation

RESIDUAL_WRITERS = ("o_proj", "down_proj", "c_proj", "out_proj", "dense_4h_to_h", "fc2", "w2")


ABLATED_ADAPTER = "ablated_adapter"


def ablate_adapter_weights(adapter: str | Path, vector: Tensor, out: str | Path, force: bool = False,
                           overwrite: bool = False) -> Path:
    """Project the unit direction out of the LoRA B matrices that write into the residual stream.

    For modules whose output is the residual stream (o_proj, down_proj, ...), B <- B - u (u^T B), so the
    adapter can no longer write along u (the model-organisms weight ablation). Other LoRA matrices are copied.
    `force` allows an adapter with no such matrix. The new adapter folder is written atomically, with a
    cfg.json (kind `ablated_adapter`) beside the PEFT files; an existing `out` is replaced only if it is an
    earlier ablated adapter (or `overwrite`).
    """
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
    if out.resolve() == source.resolve():
        raise EmlensInputError(f"{out}: the ablated adapter cannot replace its own source")
    with atomic_folder(out, ABLATED_ADAPTER, force=overwrite) as tmp:
        for item in source.iterdir():
            if item.is_file() and item.name != CFG_FILE:
                shutil.copy2(item, tmp / item.name)
        save_file(weights, tmp / "adapter_model.safetensors")
        atomic_write_json(tmp / CFG_FILE, {"kind": ABLATED_ADAPTER, "format_version": FORMAT_VERSION,
                                           "source": str(source), "ablated": changed, "versions": versions()})
    return out


@register_artifact(ABLATED_ADAPTER)
def open_ablated_adapter(folder: str | Path) -> dict:
    """`em.load` of an ablated adapter: its folder (pass it as `adapter=` to `em.load_model`), the adapter it was
    made from, and the LoRA B matrices whose writes along the direction were removed."""
    cfg = read_json(Path(folder) / CFG_FILE)
    return {"adapter": Path(folder), "source": Path(cfg["source"]), "ablated": cfg["ablated"]}
