"""Engines behind one protocol and one registry; interventions as engine-neutral site-level ops.

`auto` takes the first registered engine that supports every requested op; the hf engine interprets the ops
itself, so an intervention written only as ops steers there as its hand-written hooks did."""

import pytest
import torch

from emlens.base.errors import EmlensInputError
from emlens.generation import engines
from emlens.generation.engine import GenerationConfig, Request, generate, resolve_engine
from emlens.generation.ops import OpIntervention, SiteOp, ops_of
from emlens.steering.interventions import Ablate, AddVector, Clamp, compose, steer

GREEDY = GenerationConfig(max_new_tokens=6, temperature=0.0, engine="auto")


class AddOnly:
    """An engine that runs only `add` ops, by handing them to the hf engine (and counting what it served)."""

    name = "add-only"

    def __init__(self):
        self.served = 0

    def unavailable(self, model):
        return None

    def supports(self, model, ops):
        return ops is not None and all(op.kind == "add" for op in ops)

    def generate(self, model, requests, config, interventions=(), progress=True, on_batch=None):
        self.served += len(requests)
        return engines.ENGINES["hf"].generate(model, requests, config, interventions, progress, on_batch)

    def capture(self, model, sequences, sites, position, interventions=()):
        return engines.ENGINES["hf"].capture(model, sequences, sites, position, interventions)

    def logprobs(self, model, sequences, k):
        return engines.ENGINES["hf"].logprobs(model, sequences, k)


@pytest.fixture
def add_only():
    engine = engines.register_engine(AddOnly(), before="hf")
    yield engine
    del engines.ENGINES[engine.name]


def test_auto_takes_the_first_engine_that_supports_every_op(tiny, add_only):
    v = torch.ones(tiny.d_model)
    assert resolve_engine(tiny, "auto") == "add-only"  # no ops at all: every engine supports them
    assert resolve_engine(tiny, "auto", [AddVector(v, 1, 1.0)]) == "add-only"
    assert resolve_engine(tiny, "auto", [compose(AddVector(v, 1, 1.0), Ablate(v))]) == "hf"
    assert resolve_engine(tiny, "auto", [HooksOnly()]) == "hf"  # no ops: only the hf engine runs its hooks
    with steer(tiny, Clamp(v, 1, 0.5)):  # an active steer block counts as requested
        assert resolve_engine(tiny, "auto") == "hf"
    chat = [{"role": "user", "content": "hello"}]
    out = generate(tiny, [Request(chat, seed=0)], GREEDY, [AddVector(v, 1, 2.0)], progress=False)
    plain = generate(tiny, [Request(chat, seed=0)], GREEDY.model_copy(update={"engine": "hf"}),
                     [AddVector(v, 1, 2.0)], progress=False)
    assert add_only.served == 1 and out[0].token_ids == plain[0].token_ids


def test_the_registry_refuses_duplicates_unknown_names_and_non_engines(add_only):
    with pytest.raises(EmlensInputError, match="'add-only': already registered"):
        engines.register_engine(AddOnly())
    with pytest.raises(EmlensInputError, match="'auto': already registered"):
        engines.register_engine(type("Auto", (AddOnly,), {"name": "auto"})())
    with pytest.raises(EmlensInputError, match="lacks the Engine protocol"):
        engines.register_engine(object())
    with pytest.raises(EmlensInputError, match=r"engine 'fast': unknown \(known: auto, vllm, add-only, hf\)"):
        engines.engine_named("fast")
    assert list(engines.ENGINES) == ["vllm", "add-only", "hf"]


class HooksOnly:
    """An intervention that hooks the transformers model itself and has no ops."""

    name = "hooks-only"

    def attach(self, model, ctx=None):
        import contextlib
        return contextlib.nullcontext()


class DoubleTheSite(OpIntervention):
    """Written only as ops: the hf engine derives its hooks from them."""

    name = "double"

    def ops(self, model):
        return [SiteOp("add", "resid_post", 1, torch.full((model.d_model,), 0.25), alpha=4.0)]


def test_an_intervention_written_as_ops_steers_the_hf_engine_like_its_hook_form(tiny):
    from emlens.capture.extract import activations

    prompts = ["one two three", "four five"]
    site = "blocks.1.hook_resid_post"
    plain = activations(tiny, prompts, sites=[site], position="all")[site]
    with steer(tiny, DoubleTheSite()):
        by_ops = activations(tiny, prompts, sites=[site], position="all")[site]
    with steer(tiny, AddVector(torch.full((tiny.d_model,), 0.25), 1, 4.0)):
        by_add = activations(tiny, prompts, sites=[site], position="all")[site]
    assert torch.allclose(by_ops, plain + 1.0, atol=1e-5) and torch.equal(by_ops, by_add)
    assert ops_of(tiny, [DoubleTheSite(), HooksOnly()]) is None
    assert [op.kind for op in ops_of(tiny, [compose(DoubleTheSite(), Clamp(torch.ones(tiny.d_model), 0, 1.0))])] \
        == ["add", "clamp"]
