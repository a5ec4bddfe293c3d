"""The vllm engine: sampling, steering and activation capture in vLLM, behind the same requests as the hf engine.

- One engine per base model lives in the process (`engine_for`); adapters of that base (a training run's
  checkpoints, secure / insecure fine-tunes) are served by it as LoRA requests, several in one batch.
- A request's seed becomes vLLM's per-request seed, so its text does not depend on its batch-mates. Greedy
  decoding (temperature 0) gives the hf engine's tokens; sampled text follows vLLM's sampler, not torch's.
- Interventions become plain programs (`emlens.generation.vllm_worker`) that the workers apply per request:
  one engine pass can hold a whole dose-response grid. Each program has its own prefix-cache salt, so KV
  computed under one intervention is never reused under another.
- Capture reads pooled residual-stream vectors of whole token sequences (prompt + response) at TransformerLens
  sites, in the same worker hooks.

Steering and capture need hooks, so the engine runs eagerly (no CUDA graphs, no torch.compile) unless
`VLLMOptions.enforce_eager` is turned off, which then refuses them. By default the engine core runs in this
process (`in_process`): scripts need no `if __name__ == "__main__"` guard and vectors cross no process boundary.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from tqdm import tqdm

from emlens.base.errors import EmlensInputError
from emlens.generation.ops import SiteOp, ops_of
from emlens.generation.requests import (
    Completion,
    GenerationConfig,
    Request,
    TokenLogprob,
    decode_completion,
    eos_token_ids,
    prompt_token_ids,
    replay_tokens,
)
from emlens.model import Model, resolve_checkpoint
from emlens.sites import FAMILIES, SITE_KINDS, family_of, site_name, vllm_point

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM accepts for max_lora_rank
VLLM_FAMILIES = tuple(f.name for f in FAMILIES if f.vllm)  # families the family table places vLLM hooks for
CHUNK = 1024  # requests per engine call: finished chunks are saved, so a killed run keeps them


class VLLMOptions(BaseModel):
    """How the vLLM engine is built (hardware, not results: not part of any run's identity)."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)  # leaves room for the hf model emlens also holds
    max_model_len: int = Field(4096, ge=64)
    enforce_eager: bool = True  # hooks (steering, capture) need eager mode
    in_process: bool = True
    cpu_kv_cache_gib: int = Field(2, ge=1)
    max_loras: int = Field(4, ge=1)


_options = VLLMOptions()
_engine: VLLMEngine | None = None


def set_vllm_options(**settings) -> VLLMOptions:
    """Change how the next vLLM engine is built (e.g. `tensor_parallel_size=2`); a running one is rebuilt."""
    global _options
    _options = VLLMOptions(**{**_options.model_dump(), **settings})
    return _options


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_supports(handle: Model) -> str | None:
    """None when vLLM can serve this model, else why not (one phrase)."""
    if not vllm_installed():
        return "vLLM is not installed (bash scripts/setup-venv.sh vllm)"
    if getattr(handle, "meta", {}).get("in_memory") or not _checkpoint_on_disk(handle):
        return f"model '{handle.spec}' has no weights on disk or hub id for vLLM to load"
    return None


def _checkpoint_on_disk(handle: Model) -> bool:
    try:
        resolve_checkpoint(handle.spec)
    except EmlensInputError:
        return False
    return True


def engine_for(handle: Model) -> VLLMEngine:
    """The process's vLLM engine for this model's base weights (built on first use, rebuilt when they change)."""
    global _engine
    reason = vllm_supports(handle)
    if reason is not None:
        raise EmlensInputError(f"engine vllm: {reason}")
    settings = _engine_settings(handle)
    if _engine is not None and _engine.settings == settings:
        return _engine
    shutdown_engine()
    _engine = VLLMEngine(settings)
    return _engine


def shutdown_engine() -> None:
    global _engine
    if _engine is not None:
        _engine.close()
        _engine = None
        gc.collect()


def _engine_settings(handle: Model) -> dict:
    checkpoint = resolve_checkpoint(handle.spec)
    rank = _lora_rank(handle.adapter) if handle.adapter else 0
    current = _engine.settings if _engine is not None else {}
    # the running engine's LoRA rank is kept for its base model, so base and adapter requests share it
    max_rank = max(rank, current.get("max_lora_rank", 0)) if current.get("checkpoint") == checkpoint else rank
    longest = getattr(handle.config.get_text_config(), "max_position_embeddings", None) or _options.max_model_len
    return {"checkpoint": checkpoint, "dtype": str(handle.dtype).removeprefix("torch."),
            "max_model_len": min(_options.max_model_len, int(longest)),
            "max_lora_rank": next((r for r in LORA_RANKS if r >= max_rank), max_rank) if max_rank else 0,
            "options": _options.model_dump()}


def _lora_rank(adapter: str) -> int:
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return int(config.get("r", 8))


class VLLMEngine:
    def __init__(self, settings: dict):
        self.settings = settings
        options = VLLMOptions(**settings["options"])
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if options.in_process else "1")
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # tensors in collective_rpc arguments
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.cpu_kv_cache_gib))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        lora = settings["max_lora_rank"] > 0
        with _quiet():
            self.llm = LLM(
                model=settings["checkpoint"], dtype=settings["dtype"], max_model_len=settings["max_model_len"],
                tensor_parallel_size=options.tensor_parallel_size,
                gpu_memory_utilization=options.gpu_memory_utilization, enforce_eager=options.enforce_eager,
                seed=0, enable_lora=lora, max_lora_rank=settings["max_lora_rank"] or 16, max_loras=options.max_loras,
                worker_extension_cls="emlens.generation.vllm_worker.EmlensWorkerExtension")
            self.shape = self.llm.collective_rpc("emlens_setup")[0]
        self.hooks = options.enforce_eager
        self._lora_ids: dict[str, int] = {}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()
        del self.llm

    # ---------------------------------------------------------------- requests

    def _lora(self, handle: Model):
        if not handle.adapter:
            return None
        from vllm.lora.request import LoRARequest

        path = str(Path(handle.adapter).resolve())
        lora_id = self._lora_ids.setdefault(path, len(self._lora_ids) + 1)
        return LoRARequest(lora_name=f"adapter-{lora_id}", lora_int_id=lora_id, lora_path=path)

    def _set_programs(self, programs: dict[str, list[dict]]) -> None:
        if programs and not self.hooks:
            raise EmlensInputError("engine vllm: steering and capture need enforce_eager (set_vllm_options("
                                   "enforce_eager=True)); this engine was built without it")
        self.llm.collective_rpc("emlens_set_programs", args=(programs,))

    def _run(self, prompts: list[dict], params: list, lora):
        with _quiet():
            return self.llm.generate(prompts, params, lora_request=lora, use_tqdm=False)

    def generate(self, handle: Model, requests: Sequence[Request], config: GenerationConfig,
                 interventions: Iterable = (), progress: bool = True,
                 on_batch: Callable[[list[int], list[Completion]], None] | None = None) -> list[Completion]:
        from vllm import TokensPrompt

        shared = list(interventions)
        keys, programs, key_of = [], {}, {}
        for request in requests:
            own = tuple(id(iv) for iv in request.interventions)  # one program per intervention set, not per request
            if own not in key_of:
                ops = program_of(handle, [*shared, *request.interventions], self.shape)
                key_of[own] = _program_key(ops)
                if ops:
                    programs.setdefault(key_of[own], ops)
            keys.append(key_of[own])
        self._set_programs(programs)
        prompt_ids = prompt_token_ids(handle, requests)
        stop = sorted(eos_token_ids(handle))
        lora = self._lora(handle)
        results: list[Completion] = []
        bar = tqdm(total=len(requests), desc="generate (vllm)", unit="sample", disable=not progress)
        try:
            for start in range(0, len(requests), CHUNK):
                indices = list(range(start, min(start + CHUNK, len(requests))))
                prompts = [TokensPrompt(prompt_token_ids=prompt_ids[i], cache_salt=keys[i]) for i in indices]
                params = [_sampling_params(config, requests[i], stop, keys[i] if keys[i] in programs else None)
                           for i in indices]
                outputs = self._run(prompts, params, lora)
                completions = [replay_tokens(handle, requests[i], _completion(handle, out, len(prompt_ids[i]),
                                                                              requests[i].logprobs))
                               for i, out in zip(indices, outputs, strict=True)]
                results.extend(completions)
                if on_batch is not None:
                    on_batch(indices, completions)
                bar.update(len(indices))
        finally:
            bar.close()
            self._set_programs({})
        return results

    def next_top(self, handle: Model, sequences: Sequence[list[int]], k: int) -> list[dict[int, float]]:
        """The k most probable next tokens after each sequence, with their probabilities (one decode step each;
        sequences sharing a prompt share its KV cache through vLLM's prefix cache)."""
        from vllm import SamplingParams, TokensPrompt

        self._set_programs({})
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=k, detokenize=False)
        found = []
        for start in range(0, len(sequences), CHUNK):
            outputs = self._run([TokensPrompt(prompt_token_ids=list(ids)) for ids in sequences[start:start + CHUNK]],
                                params, self._lora(handle))
            found += [{token: math.exp(lp.logprob) for token, lp in out.outputs[0].logprobs[0].items()}
                      for out in outputs]
        return found

    def capture(self, handle: Model, sequences: Sequence[tuple[list[int], int]], sites: Sequence[tuple[int, str]],
                position: str, interventions: Iterable = ()) -> list[dict[str, Tensor]]:
        """Pooled vectors of each (token ids, prompt length) sequence at each (layer, kind) site.

        Returns, per sequence, {site name: (vectors, d_model)}: one vector for last_prompt and mean_response,
        one per token for all.
        """
        from vllm import SamplingParams, TokensPrompt

        shared = _placed_ops(handle, list(interventions), self.shape)
        programs = {}
        for i, (_, prompt_len) in enumerate(sequences):
            reads = [_read_op(handle, layer, kind, position, prompt_len, self.shape) for layer, kind in sites]
            programs[f"capture-{i}"] = _in_site_order([*shared, *reads])
        self._set_programs(programs)
        try:
            prompts = [TokensPrompt(prompt_token_ids=list(ids), cache_salt=f"capture-{i}-{os.urandom(4).hex()}")
                       for i, (ids, _) in enumerate(sequences)]
            params = [SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                     extra_args={"emlens": f"capture-{i}"}) for i in range(len(sequences))]
            self._run(prompts, params, self._lora(handle))
            captured = self.llm.collective_rpc("emlens_take_captured")[0]
        finally:
            self._set_programs({})
        names = [site_name(layer, kind) for layer, kind in sites]
        return [{name: captured[f"capture-{i}"][name] for name in names} for i in range(len(sequences))]


class VLLM:
    """The vllm engine as the registry knows it (`emlens.generation.engines.Engine`)."""

    name = "vllm"

    def unavailable(self, handle: Model) -> str | None:
        return vllm_supports(handle)

    def supports(self, handle: Model, ops) -> bool:
        """Taken by `auto` for a model on a GPU (on a CPU its start-up would dominate) that vLLM can load, when
        its worker implements every op."""
        return handle.device.type == "cuda" and vllm_supports(handle) is None and worker_applies(handle, ops)

    def generate(self, handle: Model, requests: Sequence[Request], config: GenerationConfig,
                 interventions: Iterable = (), progress: bool = True,
                 on_batch: Callable[[list[int], list[Completion]], None] | None = None) -> list[Completion]:
        return engine_for(handle).generate(handle, requests, config, interventions, progress, on_batch)

    def capture(self, handle: Model, sequences: Sequence[tuple[list[int], int]], sites: Sequence[tuple[int, str]],
                position: str, interventions: Iterable = ()) -> list[dict[str, Tensor]]:
        return engine_for(handle).capture(handle, sequences, sites, position, interventions)

    def logprobs(self, handle: Model, sequences: Sequence[list[int]], k: int) -> list[dict[int, float]]:
        return engine_for(handle).next_top(handle, sequences, k)


# ---------------------------------------------------------------- programs
#
# A program is the interventions' site-level ops (`emlens.generation.ops.SiteOp`), each placed at the hook point
# where the worker sees its site (the family table's `vllm` placement) and serialised to plain data.

WORKER_KINDS = ("add", "ablate", "clamp", "sae_ablate", "read")  # the op kinds the worker implements


def worker_applies(handle: Model, ops) -> bool:
    """Whether the worker can run every op: each is of a kind it implements, on a family it knows."""
    if ops is None:
        return False
    try:
        served = bool(family_of(handle.config).vllm)
    except EmlensInputError:
        return False
    return served and all(op.kind in WORKER_KINDS for op in ops)


def _in_site_order(ops: list[dict]) -> list[dict]:
    """Execution order: by hook point, then site; at one site, writes before reads (a read sees the steering)."""
    ordered = sorted(enumerate(ops), key=lambda item: (*item[1]["_order"], item[1]["kind"] == "read", item[0]))
    return [{k: v for k, v in op.items() if k != "_order"} for _, op in ordered]


def program_of(handle: Model, interventions: Sequence, shape: dict) -> list[dict]:
    """The worker program of some interventions: their site-level ops, placed and in execution order."""
    return _in_site_order(_placed_ops(handle, interventions, shape))


def _placed_ops(handle: Model, interventions: Sequence, shape: dict) -> list[dict]:
    ops = []
    for intervention in interventions:
        found = ops_of(handle, [intervention])
        if found is None:
            name = getattr(intervention, "name", type(intervention).__name__)
            raise EmlensInputError(f"intervention '{name}' cannot run in the vllm engine (use --engine hf)")
        ops.extend(_placed(handle, op, shape) for op in found)
    return ops


def _placed(handle: Model, op: SiteOp, shape: dict) -> dict:
    """A site-level op checked against the model, placed at its vLLM hook point, as plain data."""
    if op.kind not in WORKER_KINDS:
        raise EmlensInputError(f"engine vllm: op '{op.kind}' is not implemented in the worker (use --engine hf)")
    if op.site not in SITE_KINDS:
        raise EmlensInputError(f"site '{op.site}': unknown (known: {', '.join(SITE_KINDS)})")
    if not 0 <= op.layer < shape["n_layers"]:
        raise EmlensInputError(f"layer {op.layer} out of range (model has {shape['n_layers']} layers)")
    point, layer, part, order = vllm_point(handle.config, op.layer, op.site)
    placed = {"kind": op.kind, "point": point, "layer": layer, "part": part, "_order": order,
              "positions": op.positions, "skip_first_token": op.skip_first_token}
    if op.kind == "add":
        placed["vector"] = (op.alpha * op.vector).float().cpu()
    elif op.kind in ("ablate", "clamp"):
        placed.update(vector=op.vector.float().cpu(), alpha=float(op.alpha))
    elif op.kind == "sae_ablate":
        placed.update(sae=op.sae, latent=int(op.latent))
    else:
        placed.update(read=site_name(op.layer, op.site), pool=op.pool, prompt_len=op.prompt_len)
    return placed


def _read_op(handle: Model, layer: int, kind: str, position: str, prompt_len: int, shape: dict) -> dict:
    return _placed(handle, SiteOp("read", kind, layer, pool=position, prompt_len=prompt_len), shape)


def _program_key(ops: list[dict]) -> str:
    """A content hash of a program: equal programs share a key (and a prefix-cache salt)."""
    if not ops:
        return "none"
    digest = hashlib.sha256()
    for op in ops:
        for name in sorted(op):
            value = op[name]
            digest.update(name.encode())
            digest.update(_digest_bytes(value))
    return digest.hexdigest()[:16]


def _digest_bytes(value) -> bytes:
    if isinstance(value, Tensor):
        return value.detach().float().cpu().numpy().tobytes()
    if isinstance(value, torch.nn.Module):  # an SAE: its weights, not its repr (equal shapes print alike)
        return b"".join(_digest_bytes(t) for t in value.state_dict().values())
    return repr(value).encode()


def _sampling_params(config: GenerationConfig, request: Request, stop: list[int], program: str | None):
    """One request's vLLM sampling: its own seed, the run's decoding settings, and its worker program if any."""
    from vllm import SamplingParams

    return SamplingParams(n=1, temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_new_tokens,
                          min_tokens=config.min_new_tokens, seed=request.seed, stop_token_ids=stop, detokenize=False,
                          logprobs=request.logprobs, extra_args={"emlens": program} if program else None)


def _completion(handle: Model, output, prompt_tokens: int, logprobs: int | None = None) -> Completion:
    result = output.outputs[0]
    finish = "length" if result.finish_reason == "length" else "eos"
    recorded = None
    if logprobs is not None:
        recorded = [_token_logprob(token, step, logprobs)
                    for token, step in zip(result.token_ids, result.logprobs or [], strict=True)]
    return decode_completion(handle, list(result.token_ids), prompt_tokens, finish, recorded)


def _token_logprob(token: int, step: dict, k: int) -> TokenLogprob:
    """One step's vLLM logprobs: a dict holding the top k (by rank) and the sampled token."""
    return TokenLogprob(token, step[token].logprob,
                        {t: lp.logprob for t, lp in sorted(step.items(), key=lambda item: item[1].rank) if lp.rank <= k})


class LiveRequests:
    """vLLM's engine stepped by its caller (a server's model thread), for continuous batching and streaming:
    requests join between steps while others decode; each step's new tokens go to the request's `on_token` as
    they come (which may end the request), and each finished request's Completion (or the error that ended it)
    to its `done`. Base and adapter requests share the steps; each request runs under its own worker program,
    kept registered while any live request needs it."""

    def __init__(self, handle: Model):
        self.engine = engine_for(handle)
        self._live: dict[str, dict] = {}
        self._programs: dict[str, list[dict]] = {}
        self._users: dict[str, int] = {}
        self._count = 0

    @property
    def busy(self) -> bool:
        return bool(self._live)

    @property
    def count(self) -> int:
        return len(self._live)

    def add(self, handle: Model, request: Request, config: GenerationConfig,
            done: Callable[[Completion | Exception], None]) -> None:
        from vllm import TokensPrompt

        if engine_for(handle) is not self.engine:
            raise EmlensInputError(f"engine vllm: {handle.spec} is not served by this engine's base model")
        ops = program_of(handle, list(request.interventions), self.engine.shape)
        key = _program_key(ops)
        if ops:
            if key not in self._programs:
                self._programs[key] = ops
                self.engine._set_programs(dict(self._programs))
            self._users[key] = self._users.get(key, 0) + 1
        prompt_ids = prompt_token_ids(handle, [request])[0]
        params = _sampling_params(config, request, sorted(eos_token_ids(handle)), key if ops else None)
        self._count += 1
        request_id = f"emlens-live-{self._count}"
        self.engine.llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt_ids, cache_salt=key),
                                               params, lora_request=self.engine._lora(handle))
        self._live[request_id] = {"handle": handle, "request": request, "prompt": len(prompt_ids), "key": key,
                                  "done": done, "seen": 0}

    def step(self) -> None:
        try:
            with _quiet():
                outputs = self.engine.llm.llm_engine.step()
        except Exception as error:  # every live request hears of it
            for request_id in list(self._live):
                self._finish(request_id, error)
            raise
        for output in outputs:
            if output.request_id in self._live:
                self._advance(output)

    def _advance(self, output) -> None:
        live = self._live[output.request_id]
        handle, request, result = live["handle"], live["request"], output.outputs[0]
        stop = eos_token_ids(handle)
        for i in range(live["seen"], len(result.token_ids)):
            live["seen"] = i + 1
            token = result.token_ids[i]
            if token in stop or request.on_token is None:
                continue
            entry = _token_logprob(token, result.logprobs[i], request.logprobs) if request.logprobs is not None else None
            if request.on_token(token, entry):
                if not output.finished:
                    self.engine.llm.llm_engine.abort_request([output.request_id])
                kept = result.token_ids[:i + 1]
                entries = (None if request.logprobs is None else
                           [_token_logprob(t, result.logprobs[j], request.logprobs) for j, t in enumerate(kept)])
                self._finish(output.request_id, decode_completion(handle, list(kept), live["prompt"], "stop", entries))
                return
        if output.finished:
            self._finish(output.request_id, _completion(handle, output, live["prompt"], request.logprobs))

    def _finish(self, request_id: str, result: Completion | Exception) -> None:
        live = self._live.pop(request_id)
        key = live["key"]
        if key in self._users:
            self._users[key] -= 1
            if self._users[key] == 0:  # dropped from the next program set the workers receive
                del self._users[key], self._programs[key]
        live["done"](result)


@contextlib.contextmanager
def _quiet():
    """vLLM logs at INFO on every call; emlens's library functions stay quiet."""
    import logging

    logger = logging.getLogger("vllm")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
