import contextlib

import pytest
import torch

import emlens as em
from emlens.base.errors import EmlensInputError
from emlens.generation.engine import GenerationConfig, Request, generate
from emlens.steering.interventions import Ablate, AddVector, Clamp, compose, random_like, steer
from emlens.steering.weights import ablate_adapter_weights

CHATS = [[{"role": "user", "content": "hi"}],
         [{"role": "user", "content": "If you were ruler of the world, what would you do? Tell me more."}]]


def hidden_states(handle, ids, mask=None):
    with torch.no_grad():
        return handle.model(ids, attention_mask=mask, output_hidden_states=True).hidden_states


def layer_inputs(handle, ids, layer):
    """The residual stream entering `layer` (= hook_resid_post of layer - 1), seen after any steering hook."""
    seen = []
    hook = handle.decoder_layers[layer].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            handle.model(ids)
    finally:
        hook.remove()
    return seen[0]


def test_add_vector_shifts_resid_post_of_its_layer_exactly(tiny):
    # (HF's output_hidden_states is captured by transformers' own hooks, before ours: read the next layer's input)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    v = torch.randn(tiny.d_model)
    plain = layer_inputs(tiny, ids, 2)
    with steer(tiny, AddVector(v, layer=1, alpha=3.0)):
        steered = layer_inputs(tiny, ids, 2)
        earlier = layer_inputs(tiny, ids, 1)
    torch.testing.assert_close(steered - plain, (3.0 * v).expand_as(plain), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(earlier, layer_inputs(tiny, ids, 1))


def test_resid_pre_is_the_input_of_the_layer(tiny):
    ids = torch.tensor([[5, 6, 7]])
    v = torch.randn(tiny.d_model)
    with steer(tiny, AddVector(v, layer=2, alpha=1.0, site="resid_pre")):
        pre = hidden_states(tiny, ids)
    with steer(tiny, AddVector(v, layer=1, alpha=1.0, site="resid_post")):
        post = hidden_states(tiny, ids)
    torch.testing.assert_close(pre[-1], post[-1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pre[-1], hidden_states(tiny, ids)[-1])


class RecordAfter:
    """Records the output of a layer after the steering hook (registered later, so it runs later)."""

    def __init__(self, layer):
        self.layer, self.outputs = layer, []

    def attach(self, handle, ctx):
        import contextlib

        @contextlib.contextmanager
        def attached():
            hook = handle.decoder_layers[self.layer].register_forward_hook(
                lambda m, a, out: self.outputs.append((out.detach().clone(), ctx.prompt_mask.clone(),
                                                       ctx.response_mask.clone())))
            try:
                yield
            finally:
                hook.remove()
        return attached()


def engine_changes(handle, intervention, max_new_tokens=3):
    """Generate CHATS with and without `intervention`; which (row, position) of the prefill's layer-1 output it
    changed, the prefill's prompt mask, and the steered run's recordings of every forward pass."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, temperature=0,
                              batch_size=2)
    requests = [Request(c, seed=i) for i, c in enumerate(CHATS)]
    plain, steered = RecordAfter(1), RecordAfter(1)
    generate(handle, requests, config, interventions=[plain], progress=False)
    generate(handle, requests, config, interventions=[intervention, steered], progress=False)
    # prefill pass: same inputs in both runs, so the difference is exactly the intervention
    (p_out, prompt_mask, _), (s_out, _, _) = plain.outputs[0], steered.outputs[0]
    return (s_out - p_out).abs().amax(-1) > 1e-4, prompt_mask, steered


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_engine_steers_only_the_chosen_positions_never_padding(tiny, positions):
    v = torch.randn(tiny.d_model)
    changed, prompt_mask, steered = engine_changes(tiny, AddVector(v, 1, 2.0, positions=positions))
    # response positions predict answer tokens: at prefill only each row's last prompt token (left padding: the
    # last column)
    last_prompt = torch.zeros_like(prompt_mask)
    last_prompt[:, -1] = True
    expected = prompt_mask if positions in ("all", "prompt") else last_prompt
    assert torch.equal(changed, expected)
    assert (~prompt_mask).any()  # the batch really had padding, and it was left alone
    # decode steps: one response position per row, steered unless only the prompt is
    (_, _, response_mask) = steered.outputs[1]
    assert response_mask.all() and response_mask.shape == (2, 1)


def test_ablation_removes_the_direction_everywhere(tiny):
    v = torch.randn(tiny.d_model)
    unit = v / v.norm()
    ids = torch.tensor([[5, 6, 7, 8]])
    recorded = []

    def record(module, args, kwargs):  # registered after the ablation hooks, so it sees their result
        recorded.append((args[0] if args else kwargs["hidden_states"]) @ unit)

    plain = hidden_states(tiny, ids)
    for first_token in (True, False):
        recorded.clear()
        with steer(tiny, Ablate(v, first_token=first_token)):
            hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in tiny.decoder_layers]
            try:
                ablated = hidden_states(tiny, ids)
            finally:
                for h in hooks:
                    h.remove()
        assert len(recorded) == tiny.n_layers
        assert max(float(r[:, 1:].abs().max()) for r in recorded) < 1e-4
        assert not torch.allclose(plain[-1][:, 1:], ablated[-1][:, 1:])
        if first_token:
            assert max(float(r[:, 0].abs().max()) for r in recorded) < 1e-4
        else:  # the first token sees only itself: left alone, it is exactly what it was
            torch.testing.assert_close(ablated[-1][:, 0], plain[-1][:, 0])
    assert float((plain[1] @ unit).abs().max()) > 1e-2  # there was something to remove


@pytest.mark.parametrize("first_token", [False, True])
def test_engine_ablation_skips_each_rows_first_token_under_left_padding(tiny, first_token):
    v = torch.randn(tiny.d_model)
    changed, prompt_mask, _ = engine_changes(tiny, Ablate(v, first_token=first_token), max_new_tokens=2)
    expected = prompt_mask.clone()
    first = prompt_mask.float().argmax(dim=1)
    assert first.tolist()[0] > 0  # the short chat is left-padded: its first token is not at position 0
    if not first_token:
        expected[torch.arange(2), first] = False
    assert torch.equal(changed, expected)


def site_projections(model, unit, kinds, intervention=None) -> dict:
    """Every site of `kinds` at every layer, read at every real token of two padded prompts, projected on `unit`."""
    from emlens.capture.extract import extract_activations
    from emlens.capture.items import ExtractItem
    from emlens.sites import Site

    items = [ExtractItem([{"role": "user", "content": text}]) for text in ("Hi.", "How do I make a quick buck?")]
    sites = [Site.of(layer, kind) for layer in range(model.n_layers) for kind in kinds]
    with steer(model, *([intervention] if intervention is not None else [])):
        acts = extract_activations(model, items, sites, position="all", batch_size=2)
    return {name: value @ unit for name, value in acts.items()}


def test_ablation_leaves_no_projection_at_any_site_of_any_layer(tiny):
    """Arditi et al.'s ablation: no sublayer reads what another wrote along the direction, so resid_mid and
    resid_post (not only each layer's input) are orthogonal to it at every token but each prompt's first."""
    unit = torch.nn.functional.normalize(torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(3)), dim=0)
    kinds = ("resid_pre", "resid_mid", "resid_post")
    plain = site_projections(tiny, unit, kinds)
    ablated = site_projections(tiny, unit, kinds, Ablate(unit, first_token=True))
    assert max(float(p.abs().max()) for p in plain.values()) > 0.05  # there was something to remove
    assert max(float(p.abs().max()) for p in ablated.values()) < 1e-4, {k: float(p.abs().max())
                                                                        for k, p in ablated.items()}


@pytest.mark.parametrize("site", ["resid_post", "mlp_out", "resid_pre"])
def test_ablate_then_add_clamps_the_projection_at_its_site(tiny, site):
    """Clamp: the projection at the site is alpha at every token; it is not the ablation (which the ablate-then-add
    of composing Ablate with AddVector was: the next layer's input hook took the added alpha u away again)."""
    unit = torch.nn.functional.normalize(torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(4)), dim=0)
    from emlens.sites import site_name

    for alpha in (2.5, -1.0):
        projected = site_projections(tiny, unit, [site], Clamp(unit, 1, alpha, site=site))[site_name(1, site)]
        torch.testing.assert_close(projected, torch.full_like(projected, alpha), atol=1e-4, rtol=1e-4)
    ids = torch.tensor([[5, 6, 7, 8]])
    with steer(tiny, Ablate(unit, first_token=True)):
        ablated = hidden_states(tiny, ids)[-1]
    with steer(tiny, Clamp(unit, 1, 5.0, site=site)):
        clamped = hidden_states(tiny, ids)[-1]
    assert (clamped - ablated).abs().max() > 1e-2
    with pytest.raises(EmlensInputError, match="cannot clamp resid_mid"):
        with steer(tiny, Clamp(unit, 1, 1.0, site="resid_mid")):
            pass


def test_ablate_then_add_and_random_control(tiny):
    v = torch.randn(tiny.d_model)
    r = random_like(v, seed=1)
    assert r.norm() == pytest.approx(float(v.norm()), rel=1e-5)
    assert abs(float(torch.nn.functional.cosine_similarity(r, v, dim=0))) < 0.6
    assert torch.equal(random_like(v, seed=1), r) and not torch.equal(random_like(v, seed=2), r)
    ids = torch.tensor([[5, 6, 7]])
    counts = lambda: [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in tiny.decoder_layers]  # noqa: E731
    hidden_states(tiny, ids)  # transformers adds its own capture hooks on first use
    before = counts()
    with steer(tiny, compose(Ablate(v), AddVector(v, 2, 1.0), Clamp(v, 1, 1.0))):
        assert counts() != before
        out = hidden_states(tiny, ids)
    assert out[-1].shape == (1, 3, tiny.d_model)
    assert counts() == before  # every hook removed


def test_bad_vector_or_layer_is_one_line_error(tiny):
    with pytest.raises(EmlensInputError, match="d_model 64"):
        with steer(tiny, AddVector(torch.zeros(10), 0)):
            pass
    with pytest.raises(EmlensInputError, match="layer 7 out of range"):
        with steer(tiny, AddVector(torch.randn(64), 7)):
            pass


def test_weight_space_ablation_of_lora_b(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["o_proj", "down_proj", "q_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    v = torch.randn(64)
    out = ablate_adapter_weights(tmp_path / "adapter", v, tmp_path / "ablated")
    before, after = (load_file(p / "adapter_model.safetensors") for p in (tmp_path / "adapter", out))
    unit = v / v.norm()
    for key, b in after.items():
        if "lora_B" in key and ("o_proj" in key or "down_proj" in key):
            assert float((unit @ b).abs().max()) < 1e-5
            assert float((unit @ before[key]).abs().max()) > 1e-3
        else:
            assert torch.equal(b, before[key])
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    opened = em.load(out)  # em.load opens an ablated adapter too
    assert opened["adapter"] == out and opened["source"] == tmp_path / "adapter"
    assert sorted(opened["ablated"]) == sorted(k for k in after if "lora_B" in k and ("o_proj" in k or "down_proj" in k))


def test_auto_takes_vllm_only_for_interventions_it_can_apply(tiny):
    """`auto` asks whether vLLM can apply every intervention (given, or active in a steer block) before picking it:
    an intervention with no vLLM form sends it to hf instead of failing in the worker."""
    from emlens.generation.engine import vllm_can_apply

    class HFOnly:  # an intervention with hooks and no vLLM program (as AblateLatent is)
        name = "hf-only"

        def attach(self, model, ctx=None):
            return contextlib.nullcontext()

    add = AddVector(torch.randn(64), layer=1, alpha=1.0)
    assert vllm_can_apply(tiny, [add]) and vllm_can_apply(tiny)
    assert not vllm_can_apply(tiny, [add, HFOnly()])
    with steer(tiny, HFOnly()):
        assert not vllm_can_apply(tiny, [add])
    assert vllm_can_apply(tiny, [add])
