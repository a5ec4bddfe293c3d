"""One front for generation: `generate(handle, requests, config)` runs the engine the config names.

Engines (the registry `emlens.generation.engines.ENGINES`): `hf` (emlens's own decode loop on the transformers
model; the reference) and `vllm` (vLLM, with steering and capture in its workers). `auto` takes the first
registered engine that supports every intervention's ops: vLLM for a model on a GPU where vLLM is installed,
can serve it and its worker implements every op, else hf: on a CPU the two run at about the same speed and
vLLM's 45 s start-up would dominate. Runs record the engine `resolve_engine` chose in their cfg.json.

Interventions: those passed to `generate` apply to every request; a `Request` may carry its own on top, so one
call (one vLLM pass) can hold a whole dose-response grid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from emlens.base.errors import EmlensInputError
from emlens.generation import vllm_engine
from emlens.generation.context import Intervention, context_of
from emlens.generation.engines import ENGINES, engine_named, pick_engine, register_engine  # noqa: F401
from emlens.generation.ops import ops_of
from emlens.generation.requests import (  # noqa: F401  (re-exported: the names callers know this module by)
    DEFAULT_BATCH_SIZE,
    Completion,
    GenerationConfig,
    Request,
    eos_token_ids,
    left_pad,
    sample_seed,
)
from emlens.model import Model


def requested_ops(handle: Model, interventions: Iterable = ()):
    """The ops of every intervention given or active on the model in a `steer` block (None: one has none)."""
    return ops_of(handle, [*context_of(handle).active, *interventions])


def vllm_can_apply(handle: Model, interventions: Iterable = ()) -> bool:
    """Whether vLLM's worker can run every intervention (given, or active on the model in a `steer` block)."""
    return vllm_engine.worker_applies(handle, requested_ops(handle, interventions))


def resolve_engine(handle: Model, engine: str = "auto", interventions: Iterable = ()) -> str:
    """The engine that will run: `auto` becomes the first registered engine that supports every intervention's
    ops (vllm on a GPU where it can load the model, else hf); naming one that cannot serve the model is an error."""
    if engine == "auto":
        return pick_engine(handle, requested_ops(handle, interventions)).name
    reason = engine_named(engine).unavailable(handle)
    if reason is not None:
        raise EmlensInputError(f"engine {engine}: {reason}")
    return engine


def planned_engine(engine: str, device: str = "auto") -> str:
    """The engine `resolve_engine` will pick for a model on disk loaded on `device`, known before it is loaded
    (so a finished result made by one engine is never reused as another's)."""
    if engine != "auto":
        return engine
    cuda = device.startswith("cuda") or (device in ("auto", "shard") and torch.cuda.is_available())
    return "vllm" if cuda and vllm_engine.vllm_installed() else "hf"


def generate(handle: Model, requests: Sequence[Request], config: GenerationConfig | None = None,
             interventions: Iterable[Intervention] = (), progress: bool = True,
             on_batch: Callable[[list[int], list[Completion]], None] | None = None) -> list[Completion]:
    """Generate one completion per request, in request order.

    `on_batch(indices, completions)` is called as completions finish, so callers can persist them.
    """
    config = config or GenerationConfig()
    interventions = list(interventions)
    engine = resolve_engine(handle, config.engine, interventions)
    if engine != "hf":
        # other engines do not run the hf model's hooks: the steering of an enclosing `steer` block goes along
        interventions = [*context_of(handle).active, *interventions]
    return ENGINES[engine].generate(handle, requests, config, interventions, progress, on_batch)


def generate_text(model: Model, prompts: str | list, config: GenerationConfig | None = None, seed: int = 0,
                  progress: bool = False, interventions: Iterable[Intervention] = (), **settings) -> str | list[str]:
    """Text in, text out: `em.generate(model, "Hi")` -> str; a list of prompts (strings or chats) -> list[str].

    `settings` are GenerationConfig fields (max_new_tokens, temperature: 0 = greedy, top_p, batch_size); sample
    i is drawn with seed `seed + i`, so the output does not depend on what else is in the batch.
    """
    single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], dict))
    chats = [prompts] if single else list(prompts)
    chats = [[{"role": "user", "content": c}] if isinstance(c, str) else c for c in chats]
    config = GenerationConfig(**{**(config.model_dump() if config else {}), **settings})
    completions = generate(model, [Request(chat, seed=seed + i) for i, chat in enumerate(chats)], config,
                           interventions=interventions, progress=progress)
    texts = [c.text for c in completions]
    return texts[0] if single else texts
