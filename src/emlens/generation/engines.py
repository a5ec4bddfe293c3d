"""Engines behind one protocol, in one registry: `auto` takes the first registered engine that supports every op.

An engine serves generation, activation capture and next-token log-probabilities for a model, and says which
interventions it can apply from their site-level ops (`emlens.generation.ops`): `supports(model, ops)`, where
`ops` is None for an intervention that hooks the transformers model itself (only hf runs those). The built-in
order is vllm (on a GPU, where vLLM can load the model and its worker implements every op), then hf (the
reference, which supports everything, so `auto` always finds one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor

from emlens.base.errors import EmlensInputError
from emlens.generation.hf_engine import HF
from emlens.generation.ops import SiteOp
from emlens.generation.requests import Completion, GenerationConfig, Request
from emlens.generation.vllm_engine import VLLM
from emlens.model import Model


@runtime_checkable
class Engine(Protocol):
    name: str

    def unavailable(self, model: Model) -> str | None:
        """Why the engine cannot serve this model at all (one phrase), or None."""

    def supports(self, model: Model, ops: Sequence[SiteOp] | None) -> bool:
        """Whether `auto` may take it for this model and these ops."""

    def generate(self, model: Model, requests: Sequence[Request], config: GenerationConfig,
                 interventions: Iterable = (), progress: bool = True,
                 on_batch: Callable[[list[int], list[Completion]], None] | None = None) -> list[Completion]: ...

    def capture(self, model: Model, sequences: Sequence[tuple[list[int], int]], sites: Sequence[tuple[int, str]],
                position: str, interventions: Iterable = ()) -> list[dict[str, Tensor]]: ...

    def logprobs(self, model: Model, sequences: Sequence[list[int]], k: int) -> list[dict[int, float]]: ...


ENGINES: dict[str, Engine] = {}  # in `auto`'s order of preference


def register_engine(engine: Engine, before: str | None = None) -> Engine:
    """Add an engine (ahead of `before` in `auto`'s order, else last); a second engine of one name is an error."""
    if not isinstance(engine, Engine):
        raise EmlensInputError(f"engine {engine!r}: lacks the Engine protocol's methods")
    if engine.name in ENGINES or engine.name == "auto":
        raise EmlensInputError(f"engine '{engine.name}': already registered")
    if before is not None and before not in ENGINES:
        raise EmlensInputError(f"engine '{before}': unknown (known: {', '.join(ENGINES)})")
    entries = list(ENGINES.items())
    at = [name for name, _ in entries].index(before) if before is not None else len(entries)
    entries.insert(at, (engine.name, engine))
    ENGINES.clear()
    ENGINES.update(entries)
    return engine


def engine_named(name: str) -> Engine:
    if name not in ENGINES:
        raise EmlensInputError(f"engine '{name}': unknown (known: {', '.join(['auto', *ENGINES])})")
    return ENGINES[name]


def pick_engine(model: Model, ops: Sequence[SiteOp] | None) -> Engine:
    """`auto`: the first registered engine that supports every op."""
    for engine in ENGINES.values():
        if engine.supports(model, ops):
            return engine
    raise EmlensInputError("engine auto: no registered engine supports these interventions")


register_engine(VLLM())
register_engine(HF())
