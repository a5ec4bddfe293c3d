"""The served models (a base and its adapters, one model name each), the registered steering, and the batcher.

`load_server(MODEL, adapters={"insecure": PATH}, directions={"evil": PATH})` loads everything and checks it
before anything is served (`emlens.serve.app` serves it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
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
    # entered around each engine call of this model: on the hf engine, switches the shared peft model's adapter
    activate: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext, repr=False)

    def describe(self) -> dict:
        return {"model": self.handle.spec, "adapter": self.adapter, "adapter_path": self.handle.adapter,
                "fingerprint": self.handle.fingerprint}


class Server:
    def __init__(self, models: dict[str, Served], registered: Registered, config: ServeConfig,
                 release: Callable[[], None] | None = None):
        self.models, self.registered, self.config, self._release = models, registered, config, release
        self.base = next(iter(models.values())).handle
        self.steerings = Steerings(self.base, registered)
        self.batcher = (LiveBatcher(self.base) if config.engine == "vllm" else
                        Batcher(config.batch_window_ms / 1000, config.max_batch))
        self.context = int(getattr(self.base.config.get_text_config(), "max_position_embeddings", 0) or 0)

    def close(self) -> None:
        self.batcher.close()
        if self._release is not None:  # the base model as it was loaded: the adapters' layers taken out
            self._release()
            self._release = None


def served_name(spec: str) -> str:
    """The API name of a model spec: an embedded name as is, a folder by its name, a hub id by its last part."""
    return spec if spec in EMBEDDED else Path(spec.rstrip("/")).name


def lora_handle(base: Model, path: str) -> Model:
    """The base with an adapter, served by vLLM as LoRA requests on the base weights: only the adapter's identity
    goes beside the loaded base."""
    folder = adapter_fits(base.base_model, None, base.spec, path)
    return dataclasses.replace(base, adapter=str(folder), runtime={},
                               fingerprint=combine_fingerprints(base.base_fingerprint, folder_fingerprint(folder)))


def shared_adapters(base: Model, adapters: dict[str, str]) -> tuple[dict[str, Served], Callable[[], None]]:
    """The hf engine's adapters as named adapters of one peft model over the base's weights (one copy of the weights
    whatever their number). The adapters' layers are off except around an engine call of their model (so the base
    model, and any other use of it, runs as loaded); returns the adapters' Served (named after the adapter) and the
    release that takes the adapters' layers out of the base model again."""
    from peft import PeftModel

    handles, peft_model = {}, None
    for name, path in adapters.items():
        handle = lora_handle(base, path)
        with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(base.model, handle.adapter, adapter_name=name)
            else:
                peft_model.load_adapter(handle.adapter, adapter_name=name)
        handles[name] = dataclasses.replace(handle, model=peft_model)
    layers = peft_model.eval().base_model
    layers.disable_adapter_layers()

    @contextlib.contextmanager
    def switched_to(name: str):
        peft_model.set_adapter(name)
        layers.enable_adapter_layers()
        try:
            yield
        finally:
            layers.disable_adapter_layers()

    served = {name: Served(name, handle, name, lambda n=name: switched_to(n)) for name, handle in handles.items()}
    return served, peft_model.unload


def load_server(model: str = DEFAULT_MODEL, adapters: dict[str, str] | None = None,
                directions: dict[str, str] | None = None, saes: dict[str, str] | None = None,
                config: ServeConfig | None = None, device: str = "auto", dtype: str | None = None,
                name: str | None = None, force: bool = False, handle: Model | None = None) -> Server:
    """Load the model, its adapters, directions and SAEs, and check them all (one line for the first problem)."""
    config = config or ServeConfig()
    base = handle or load_model(model, device=device, dtype=dtype)
    resolve_engine(base, config.engine)  # one line now if the engine cannot serve this model
    base_name = name or served_name(base.spec)
    for adapter_name in adapters or {}:
        if ":" in adapter_name or "/" in adapter_name:
            raise EmlensInputError(f"--adapter {adapter_name}: a name may not hold ':' or '/'")
    registered = Registered.load(base, directions or {}, saes or {}, force=force)
    models, release = {base_name: Served(base_name, base)}, None
    if config.engine == "hf" and adapters:
        served, release = shared_adapters(base, adapters)
        models.update({f"{base_name}:{n}": dataclasses.replace(s, name=f"{base_name}:{n}") for n, s in served.items()})
    else:
        models.update({f"{base_name}:{n}": Served(f"{base_name}:{n}", lora_handle(base, path), n)
                       for n, path in (adapters or {}).items()})
    if config.engine == "vllm":
        for served in sorted(models.values(), key=lambda s: s.handle.adapter is None):
            engine_for(served.handle)  # adapters first: the engine is built once, with room for their LoRA rank
    return Server(models, registered, config, release)
