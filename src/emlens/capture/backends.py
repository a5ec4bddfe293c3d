"""Extraction backends: torch hooks (the default), TransformerLens, nnsight, vLLM; each returns pooled vectors per site."""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from torch import Tensor

from emlens.base.errors import EmlensInputError
from emlens.capture.items import Batch, pool
from emlens.generation import vllm_engine
from emlens.generation.context import context_of
from emlens.model import Model
from emlens.sites import Site, check_site_kind, decoder_of, family_of, hook_site

BACKENDS = ("torch-hooks", "transformerlens", "nnsight", "vllm")
DEFAULT_BACKEND = "torch-hooks"


# ---------------------------------------------------------------- backends


class _StopForward(Exception):
    """Raised by the last hook needed: the layers after it (and the final norm) never run."""


class TorchHooksBackend:
    """Forward hooks on the HF decoder layers; pools inside the hook and stops after the last site needed."""

    name = "torch-hooks"

    def __init__(self, handle: Model):
        self.handle = handle

    def run(self, batch: Batch, sites: list[Site], position: str) -> dict[str, Tensor]:
        found: dict[str, Tensor] = {}
        last = max(sites)

        def sink_for(site: Site):
            def sink(hidden: Tensor) -> None:
                found[site.name] = pool(hidden, batch, position)
                if site == last:
                    raise _StopForward
            return sink

        handles = [hook_site(self.handle.base_model, site.layer, site.kind, sink_for(site)) for site in sites]
        try:
            decoder_of(self.handle.base_model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                         position_ids=batch.position_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return found


class NNsightBackend:
    """An nnsight trace of the decoder (no LM head); sites are read in execution order, pooled in the trace."""

    name = "nnsight"

    def __init__(self, handle: Model):
        import nnsight

        self.nnsight = nnsight
        self.handle, self.causal_lm = handle, handle.base_model
        self.model = nnsight.NNsight(decoder_of(handle.base_model))

    def _envoy_value(self, site: Site):
        check_site_kind(self.causal_lm, site.kind)
        hook = family_of(self.causal_lm.config).read[site.kind]
        envoy = self.model.layers[site.layer]
        for part in filter(None, hook.module.split(".")):
            envoy = getattr(envoy, part)
        return envoy.input if hook.where == "input" else envoy.output

    def run(self, batch: Batch, sites: list[Site], position: str) -> dict[str, Tensor]:
        if context_of(self.handle).described:
            # nnsight reads a module's output before the module's torch hooks run, so it would miss the steering
            raise EmlensInputError("backend nnsight: cannot read activations under emlens steering (it sees module "
                                   "outputs before their hooks); use backend torch-hooks")
        with self.model.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, use_cache=False) as tracer:
            pooled = self.nnsight.save([pool(_first(self._envoy_value(s)), batch, position) for s in sites])
            tracer.stop()
        return {s.name: v for s, v in zip(sites, pooled, strict=False)}


class TransformerLensBackend:
    """TransformerBridge hooks on a COPY of the model (booting the bridge rewires the model it wraps)."""

    name = "transformerlens"

    def __init__(self, handle: Model):
        from transformer_lens.model_bridge import TransformerBridge

        model = copy.deepcopy(handle.model)
        # The bridge cannot wrap a PeftModel; the LoRA layers live on inside the base model.
        hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            self.bridge = TransformerBridge.boot_transformers(
                handle.spec, device=str(handle.device), dtype=handle.dtype, tokenizer=handle.tokenizer,
                hf_model=hf_model)

    def run(self, batch: Batch, sites: list[Site], position: str) -> dict[str, Tensor]:
        found: dict[str, Tensor] = {}

        def hook_for(site: Site):
            def hook(value, hook):
                found[site.name] = pool(value, batch, position)
                return value
            return hook

        stop = max(s.layer for s in sites) + 1
        with self.bridge.hooks(fwd_hooks=[(s.name, hook_for(s)) for s in sites]):
            self.bridge(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                        return_type=None, stop_at_layer=stop if stop < len(self.bridge.blocks) else None)
        return found


class VLLMBackend:
    """vLLM's workers read the sites in the same pass that serves generation (`emlens.generation.vllm_engine`).

    Each row is one prompt-only request of its real tokens (no padding reaches vLLM); the steering of an
    enclosing `em.steer` block is applied there too.
    """

    name = "vllm"
    batch_size = 256  # rows per engine call: vLLM schedules them itself

    def __init__(self, handle: Model):
        self.handle, self.engine = handle, vllm_engine.engine_for(handle)

    def run(self, batch: Batch, sites: list[Site], position: str) -> dict[str, Tensor]:
        sequences = []
        for row in range(batch.input_ids.shape[0]):
            real = batch.attention_mask[row].bool()
            padding = int((~real).sum())
            sequences.append((batch.input_ids[row][real].tolist(), int(batch.last_prompt[row]) - padding + 1))
        pooled = self.engine.capture(self.handle, sequences, [(s.layer, s.kind) for s in sites], position,
                                     interventions=context_of(self.handle).active)
        return {s.name: torch.cat([p[s.name] for p in pooled]) for s in sites}


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def make_backend(handle: Model, backend: str = DEFAULT_BACKEND):
    classes = {"torch-hooks": TorchHooksBackend, "transformerlens": TransformerLensBackend, "nnsight": NNsightBackend,
               "vllm": VLLMBackend}
    if backend not in classes:
        raise EmlensInputError(f"backend '{backend}': unknown (known: {', '.join(BACKENDS)})")
    return classes[backend](handle)
