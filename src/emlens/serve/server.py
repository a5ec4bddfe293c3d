"""The served models (a base and its adapters, one model name each), the registered steering, and the batcher.

`load_server(MODEL, adapters={"insecure": PATH}, directions={"evil": PATH})` loads everything and checks it
before anything is served (`emlens.serve.app` serves it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from emlens.base.errors import EmlensInputError
from emlens.generation.engine import resolve_engine
from emlens.generation.vllm_engine import engine_for
from emlens.model import (
    DEFAULT_MODEL,
    EMBEDDED,
    Model,
    adapter_fits,
    combine_fingerprints,
    folder_fingerprint,
    load_model,
)
from emlens.serve.batcher import Batcher, LiveBatcher
from emlens.serve.config import ServeConfig
from emlens.serve.steering import Registered, Steerings


@dataclass
class Served:
    """One model name of the API: the base model, or the base with one adapter (`MODEL:NAME`)."""

    name: str
    handle: Model
    adapter: str | None = None  # the adapter's registered name

    def describe(self) -> dict:
        return {"model": self.handle.spec, "adapter": self.adapter, "adapter_path": self.handle.adapter,
                "fingerprint": self.handle.fingerprint}


class Server:
    def __init__(self, models: dict[str, Served], registered: Registered, config: ServeConfig):
        self.models, self.registered, self.config = models, registered, config
        self.base = next(iter(models.values())).handle
        self.steerings = Steerings(self.base, registered)
        self.batcher = (LiveBatcher(self.base) if config.engine == "vllm" else
                        Batcher(config.batch_window_ms / 1000, config.max_batch))
        self.context = int(getattr(self.base.config.get_text_config(), "max_position_embeddings", 0) or 0)

    def close(self) -> None:
        self.batcher.close()


def served_name(spec: str) -> str:
    """The API name of a model spec: an embedded name as is, a folder by its name, a hub id by its last part."""
    return spec if spec in EMBEDDED else Path(spec.rstrip("/")).name


def adapter_handle(base: Model, path: str, engine: str, device: str, dtype) -> Model:
    """The base with an adapter. The vllm engine serves adapters as LoRA requests on the base weights, so it needs
    only the adapter's identity beside the loaded base; the hf engine runs the adapter, so it gets its own copy."""
    if engine == "hf":
        return load_model(base.spec, adapter=path, device=device, dtype=dtype)
    folder = adapter_fits(base.base_model, None, base.spec, path)
    return dataclasses.replace(base, adapter=str(folder), runtime={},
                               fingerprint=combine_fingerprints(base.base_fingerprint, folder_fingerprint(folder)))


def load_server(model: str = DEFAULT_MODEL, adapters: dict[str, str] | None = None,
                directions: dict[str, str] | None = None, saes: dict[str, str] | None = None,
                config: ServeConfig | None = None, device: str = "auto", dtype: str | None = None,
                name: str | None = None, force: bool = False, handle: Model | None = None) -> Server:
    """Load the model, its adapters, directions and SAEs, and check them all (one line for the first problem)."""
    config = config or ServeConfig()
    base = handle or load_model(model, device=device, dtype=dtype)
    resolve_engine(base, config.engine)  # one line now if the engine cannot serve this model
    base_name = name or served_name(base.spec)
    models = {base_name: Served(base_name, base)}
    for adapter_name, path in (adapters or {}).items():
        if ":" in adapter_name or "/" in adapter_name:
            raise EmlensInputError(f"--adapter {adapter_name}={path}: a name may not hold ':' or '/'")
        full = f"{base_name}:{adapter_name}"
        models[full] = Served(full, adapter_handle(base, path, config.engine, device, dtype), adapter_name)
    registered = Registered.load(base, directions or {}, saes or {}, force=force)
    if config.engine == "vllm":
        for served in sorted(models.values(), key=lambda s: s.handle.adapter is None):
            engine_for(served.handle)  # adapters first: the engine is built once, with room for their LoRA rank
    return Server(models, registered, config)
