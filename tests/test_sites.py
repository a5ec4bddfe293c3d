"""The site table (`emlens.sites`) on a tiny random model of every architecture family it knows.

Each model is built from a config (random weights, no download). Every test reads or writes through the real
users of the table: the torch-hooks and nnsight extraction backends, and the AddVector / Ablate interventions.
Batches are two prompts of different lengths, left-padded, so padding is always in play.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    OlmoConfig,
    OlmoForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from emlens.base.errors import EmlensInputError
from emlens.capture.extract import extract_activations
from emlens.capture.items import ExtractItem, tokenize_items
from emlens.model import wrap_model
from emlens.sites import SITE_KINDS, Site, check_site_kind, decoder_layers, decoder_of, family_of, hook_site, site_name
from emlens.steering.interventions import Ablate, AddVector, steer
from tests.conftest import build_tiny_tokenizer

N_LAYERS, D_MODEL = 3, 32
ATOL, RTOL = 1e-5, 1e-4
SHAPE = dict(hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
             max_position_embeddings=256, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GQA = dict(num_key_value_heads=2, head_dim=8)

# id -> (config class, causal LM class, extra config fields, expected family name): every model type in the table
CASES = {
    "llama": (LlamaConfig, LlamaForCausalLM, GQA, "llama"),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, GQA, "llama"),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, GQA, "llama"),
    "gemma": (GemmaConfig, GemmaForCausalLM, GQA, "llama"),
    "olmo": (OlmoConfig, OlmoForCausalLM, GQA, "llama"),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"num_key_value_heads": 2}, "llama"),
    "smollm3": (SmolLM3Config, SmolLM3ForCausalLM, GQA, "llama"),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, GQA, "olmo2"),
    "granite": (GraniteConfig, GraniteForCausalLM, {**GQA, "residual_multiplier": 0.22}, "granite"),
    "mistral": (MistralConfig, MistralForCausalLM, {**GQA, "sliding_window": 8}, "llama"),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {**GQA, "sliding_window": 8}, "gemma2"),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM, {**GQA, "sliding_window": 8}, "gemma2"),
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM, {"use_parallel_residual": False}, "gpt_neox"),
    "gpt_neox_parallel": (GPTNeoXConfig, GPTNeoXForCausalLM, {"use_parallel_residual": True}, "gpt_neox"),
}
PROMPTS = ["Hi.", "If you were ruler of the world, what are some things you'd do? Tell me about the quick brown fox."]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


_MODELS: dict = {}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request, tokenizer):
    """(case id, emlens Model) for one family; each model is built once per module and shared (tests only add
    hooks inside `with` blocks, which remove them)."""
    name = request.param
    if name not in _MODELS:
        config_cls, lm_cls, extra, _ = CASES[name]
        torch.manual_seed(0)
        config = config_cls(vocab_size=len(tokenizer), **SHAPE, **extra)
        _MODELS[name] = wrap_model(lm_cls(config).eval(), tokenizer, spec=f"tiny-{name}")
    return name, _MODELS[name]


def parallel(model) -> bool:
    return bool(getattr(model.config, "use_parallel_residual", False))


def kinds_of(model) -> list[str]:
    """The site kinds the table serves for this model (Granite: resid_pre and resid_post only)."""
    served = family_of(model.config).read
    return [k for k in SITE_KINDS if k in served and not (k == "resid_mid" and parallel(model))]


def items() -> list[ExtractItem]:
    return [ExtractItem([{"role": "user", "content": p}], None, {"id": i}) for i, p in enumerate(PROMPTS)]


def row_lengths(model) -> list[int]:
    return [len(t.ids) for t in tokenize_items(model, items())]


def read(model, kinds=None, backend="torch-hooks", layers=None) -> dict[str, torch.Tensor]:
    """Every site (of `kinds`, at `layers`) at every real token: {name: (tokens of both rows, d_model)}."""
    kinds = kinds or kinds_of(model)
    layers = range(model.n_layers) if layers is None else layers
    sites = sorted(Site.of(layer, kind) for layer in layers for kind in kinds)
    lengths = row_lengths(model)
    assert lengths[0] != lengths[1]  # the batch is padded
    acts = extract_activations(model, items(), sites, position="all", batch_size=2, backend=backend)
    assert all(v.shape == (sum(lengths), model.d_model) for v in acts.values())
    return acts


def close(actual, expected, atol=ATOL, rtol=RTOL, msg=None):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=msg)


# ---------------------------------------------------------------- the table itself


def test_family_and_decoder(case):
    name, model = case
    family = family_of(model.config)
    assert family.name == CASES[name][3]
    assert model.config.model_type in family.model_types
    layers = decoder_layers(model.base_model)
    assert len(layers) == N_LAYERS and model.decoder_layers is layers
    assert decoder_of(model.base_model).layers is layers
    assert decoder_of(model.base_model) is not model.base_model  # the decoder, not the LM with its head
    for kind in kinds_of(model):  # every hook the table names exists in this architecture
        for hook in {family.read[kind], family.write.get(kind, family.read[kind])}:
            module = layers[0]
            for part in filter(None, hook.module.split(".")):
                module = getattr(module, part)
            assert isinstance(module, torch.nn.Module)


def test_unsupported_model_type_is_a_one_line_error():
    with pytest.raises(EmlensInputError, match="model type 'gpt2'") as info:
        family_of(GPT2Config(n_layer=1, n_embd=32, n_head=2))
    assert "\n" not in str(info.value) and "llama" in str(info.value)


def test_unknown_kind_is_a_one_line_error(case):
    _, model = case
    with pytest.raises(EmlensInputError, match="site kind 'resid_top'"):
        check_site_kind(model.base_model, "resid_top")
    with pytest.raises(EmlensInputError, match="unknown"):
        hook_site(model.base_model, 0, "hook_resid_post", lambda h: None)


# ---------------------------------------------------------------- reading


def check_identities(model, acts, name: str, written: Site | None = None) -> None:
    """resid_pre + attn_out == resid_mid and resid_mid + mlp_out == resid_post (parallel residual: resid_pre +
    attn_out + mlp_out == resid_post); resid_post[l] == resid_pre[l + 1]. An addition at `written` breaks the
    one equation that has that site on its own side, and only that one."""
    def skip(layer: int, kind: str) -> bool:
        return written is not None and (written.layer, written.kind) == (layer, kind)

    for layer in range(model.n_layers):
        get = lambda kind, layer=layer: acts[site_name(layer, kind)]  # noqa: E731
        if "attn_out" not in kinds_of(model):
            pass  # only the stream between layers is served
        elif parallel(model):
            if not skip(layer, "resid_post"):
                close(get("resid_pre") + get("attn_out") + get("mlp_out"), get("resid_post"), msg=f"{name} {layer}")
        else:
            if not skip(layer, "resid_mid"):
                close(get("resid_pre") + get("attn_out"), get("resid_mid"), msg=f"{name} {layer} resid_mid")
            if not skip(layer, "resid_post"):
                close(get("resid_mid") + get("mlp_out"), get("resid_post"), msg=f"{name} {layer} resid_post")
        if layer + 1 < model.n_layers and not skip(layer + 1, "resid_pre"):
            close(get("resid_post"), acts[site_name(layer + 1, "resid_pre")], atol=0, rtol=0)


def test_residual_identities(case):
    name, model = case
    acts = read(model)
    for layer in range(model.n_layers):
        get = lambda kind, layer=layer: acts[site_name(layer, kind)]  # noqa: E731
        if "attn_out" not in kinds_of(model):
            continue
        for kind in ("attn_out", "mlp_out"):  # the sublayers write something, so the sums mean something
            assert get(kind).abs().max() > 1e-2, (name, layer, kind)
        assert (get("attn_out") - get("mlp_out")).abs().max() > 1e-2
    check_identities(model, acts, name)


def test_parallel_residual_has_no_resid_mid(case):
    name, model = case
    if not parallel(model):
        if "resid_mid" in kinds_of(model):
            check_site_kind(model.base_model, "resid_mid")  # no error
        return
    with pytest.raises(EmlensInputError, match="resid_mid") as info:
        extract_activations(model, items(), [site_name(1, "resid_mid")], position="all")
    assert "\n" not in str(info.value)
    for backend in ("torch-hooks", "nnsight"):
        with pytest.raises(EmlensInputError, match="parallel residual"):
            extract_activations(model, items(), [site_name(0, "resid_mid")], backend=backend)
    with pytest.raises(EmlensInputError, match="parallel residual") as info:
        with steer(model, AddVector(torch.ones(model.d_model), 1, site="resid_mid")):
            pass
    assert "\n" not in str(info.value)


def test_index_convention_matches_hf_hidden_states(case):
    """resid_pre[l] == hidden_states[l]; resid_post[l] == hidden_states[l + 1] below the last layer; the last
    layer's resid_post is the layer's raw output (HF applies the final norm to hidden_states[-1])."""
    name, model = case
    acts = read(model, ["resid_pre", "resid_post"])
    ids = [t.ids for t in tokenize_items(model, items())]
    offset = 0
    for row in ids:
        n = len(row)
        with torch.no_grad():  # each row alone, unpadded
            hs = model.base_model(input_ids=torch.tensor([row]), output_hidden_states=True).hidden_states
        assert len(hs) == model.n_layers + 1
        for layer in range(model.n_layers):
            pre = acts[site_name(layer, "resid_pre")][offset:offset + n]
            post = acts[site_name(layer, "resid_post")][offset:offset + n]
            close(pre, hs[layer][0], msg=f"{name} resid_pre {layer}")
            if layer < model.n_layers - 1:
                close(post, hs[layer + 1][0], msg=f"{name} resid_post {layer}")
        last = acts[site_name(model.n_layers - 1)][offset:offset + n]
        decoder = decoder_of(model.base_model)
        final_norm = getattr(decoder, "norm", None) or decoder.final_layer_norm
        assert (last - hs[-1][0]).abs().max() > 1e-3
        close(final_norm(last), hs[-1][0], msg=f"{name} final norm")
        offset += n


def test_nnsight_reads_what_torch_hooks_reads(case):
    name, model = case
    hooks = read(model)
    traced = read(model, backend="nnsight")
    assert traced.keys() == hooks.keys()
    for site, value in hooks.items():
        close(traced[site], value, msg=f"{name} {site}")


# ---------------------------------------------------------------- writing


def _unit(seed: int) -> torch.Tensor:
    v = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


@pytest.mark.parametrize("kind", SITE_KINDS)
def test_add_vector_moves_its_site_by_alpha_v(case, kind):
    name, model = case
    if kind not in family_of(model.config).read:  # Granite's sublayer sites: refused in one line
        with pytest.raises(EmlensInputError, match=f"site kind '{kind}': not served for granite") as info:
            with steer(model, AddVector(_unit(1), 1, 3.0, site=kind)):
                pass
        assert "\n" not in str(info.value)
        return
    if kind not in kinds_of(model):
        pytest.skip("no resid_mid under the parallel residual (tested above)")
    layer, alpha, v = 1, 3.0, _unit(1)
    delta = alpha * v
    before = read(model)
    with steer(model, AddVector(v, layer, alpha, site=kind)):
        after = read(model)
    target = Site.of(layer, kind)
    # the sites that are the written one plus things it does not feed, so they move by exactly alpha * v
    exact = {target.name}
    if kind == "attn_out":
        exact.add(site_name(layer, "resid_post" if parallel(model) else "resid_mid"))
    if kind in ("mlp_out", "resid_post"):
        exact.add(site_name(layer, "resid_post"))
    if kind == "resid_post":
        exact.add(site_name(layer + 1, "resid_pre"))
    for site in sorted(Site.of(lay, k) for lay in range(model.n_layers) for k in kinds_of(model)):
        moved = after[site.name] - before[site.name]
        if site < target:
            assert moved.abs().max() == 0, f"{name}: writing {kind} changed the earlier site {site.name}"
        elif site.name in exact:
            close(moved, delta.expand_as(moved), msg=f"{name}: writing {kind}, {site.name} moved by")
        elif site.layer == layer and site.kind == "resid_post":
            assert moved.abs().max() > 1e-3, f"{name}: writing {kind} did not reach {site.name}"
    # the write is part of the residual stream, not a side input of one sublayer: every other sum still adds up
    check_identities(model, after, f"{name} writing {kind}", written=target)
    # the same holds when the write and the read share one hook: read only the target site
    with steer(model, AddVector(v, layer, alpha, site=kind)):
        alone = read(model, [kind], layers=[layer])
    close(alone[target.name], before[target.name] + delta)


def test_add_vector_spares_padding(case):
    """Padded positions are not steered: the write reaches real tokens only."""
    _, model = case
    v, seen = _unit(2), {}

    def keep(hidden):
        seen["h"] = hidden.detach().clone()

    ids = [t.ids for t in tokenize_items(model, items())]
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in ids])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in ids])[:, None]).long()
    results = []
    for intervention in ([], [AddVector(v, 0, 5.0, site="resid_post")]):
        with steer(model, *intervention):
            handle = hook_site(model.base_model, 0, "resid_post", keep)
            try:
                with torch.no_grad():
                    model.base_model(input_ids=input_ids, attention_mask=mask)
            finally:
                handle.remove()
        results.append(seen["h"])
    moved = results[1] - results[0]
    real = mask.bool()
    close(moved[real], (5.0 * v).expand(int(real.sum()), -1))
    assert moved[~real].abs().max() == 0


def test_ablate_leaves_every_site_of_the_stream_orthogonal(case):
    """resid_pre, resid_mid and resid_post at every layer, every token but each row's first (the attention sink)."""
    name, model = case
    v = _unit(3) * 7.0  # not unit: Ablate normalizes
    unit = v / v.norm()
    if "attn_out" not in kinds_of(model):  # Granite: the sublayer outputs it would project cannot be reached
        with pytest.raises(EmlensInputError, match="not served for granite"):
            with steer(model, Ablate(v)):
                pass
        return
    stream = [k for k in ("resid_pre", "resid_mid", "resid_post") if k in kinds_of(model)]
    with steer(model, Ablate(v)):
        acts = read(model, stream)
    starts = torch.tensor([0, *row_lengths(model)[:-1]]).cumsum(0)  # first real token of each row in "all"
    first = torch.zeros(next(iter(acts.values())).shape[0], dtype=torch.bool)
    first[starts] = True
    for layer in range(model.n_layers):
        along = acts[site_name(layer, "resid_pre")] @ unit
        assert along[~first].abs().max() < 1e-4, f"{name}: resid_pre {layer} keeps the direction"
        assert along[first].abs().min() > 1e-4, f"{name}: the first token was ablated at layer {layer}"
        for kind in stream[1:]:
            along_kind = acts[site_name(layer, kind)] @ unit
            assert along_kind[~first].abs().max() < 1e-4, f"{name}: {kind} {layer} keeps the direction"


def test_hooks_sharing_a_module_run_in_site_order(case):
    """An addition to resid_mid sits on the module attn_out is read from; attn_out never sees it, whichever hook
    was placed first, and every hook comes off (a second remove does nothing)."""
    name, model = case
    if "resid_mid" not in kinds_of(model):
        pytest.skip("no resid_mid (parallel residual, or not served)")
    lm, v = model.base_model, _unit(5)
    ids = torch.tensor([tokenize_items(model, items())[1].ids])
    seen: dict[str, torch.Tensor] = {}

    def reader(key):
        return lambda h: seen.__setitem__(key, h.detach().clone())

    def run(*placed):
        handles = [hook_site(lm, 1, kind, change, write=write) for kind, change, write in placed]
        try:
            with torch.no_grad():
                decoder_of(lm)(input_ids=ids)
        finally:
            for handle in handles:
                handle.remove()
                handle.remove()

    hooks_before = _hook_count(lm)
    run(("attn_out", reader("attn"), False), ("resid_mid", reader("mid"), False))
    base = dict(seen)
    add = ("resid_mid", lambda h: h + v, True)
    for placed in ([add, ("attn_out", reader("attn"), False), ("resid_mid", reader("mid"), False)],
                   [("attn_out", reader("attn"), False), add, ("resid_mid", reader("mid"), False)]):
        run(*placed)
        assert torch.equal(seen["attn"], base["attn"]), name
        close(seen["mid"], base["mid"] + v)
    assert _hook_count(lm) == hooks_before


def test_nnsight_refuses_to_read_under_steering(case):
    """nnsight sees a module's output before that module's torch hooks, so under emlens steering it would miss
    an addition made on the very module it reads: it refuses, in one line, rather than read the wrong values."""
    name, model = case
    with steer(model, AddVector(_unit(4), 1, 3.0, site="resid_post")):
        with pytest.raises(EmlensInputError, match="backend nnsight: cannot read activations under emlens steering"):
            read(model, backend="nnsight")
    read(model, backend="nnsight")  # and reads again once the steering is gone


# ---------------------------------------------------------------- Gemma-3 multimodal (decoder under the VLM)


@pytest.fixture(scope="module")
def gemma3_vlm(tokenizer):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(0)
    text = Gemma3TextConfig(vocab_size=len(tokenizer), **SHAPE, **GQA, sliding_window=8)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    return Gemma3ForConditionalGeneration(config).eval()


def test_gemma3_multimodal_sites(gemma3_vlm, tokenizer):
    """Gemma-3 with a vision tower: the decoder is `model.language_model`, with the Gemma-2 table; reading
    every site through `hook_site` on a left-padded text batch gives the residual identities and HF's
    hidden_states."""
    lm = gemma3_vlm
    assert family_of(lm.config).name == "gemma3"
    assert decoder_of(lm) is lm.model.language_model and len(decoder_layers(lm)) == N_LAYERS
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    real = mask.bool()
    seen: dict[tuple[int, str], torch.Tensor] = {}
    with torch.no_grad():  # HF installs its own output-capturing hooks on the first such call, and keeps them
        lm(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    hooks_before = _hook_count(lm)
    handles = [hook_site(lm, layer, kind, lambda h, key=(layer, kind): seen.__setitem__(key, h.detach().clone()))
               for layer in range(N_LAYERS) for kind in SITE_KINDS]
    try:
        with torch.no_grad():
            hs = lm(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    for layer in range(N_LAYERS):
        get = lambda kind, layer=layer: seen[layer, kind][real]  # noqa: E731
        assert get("attn_out").abs().max() > 1e-2 and get("mlp_out").abs().max() > 1e-2
        close(get("resid_pre") + get("attn_out"), get("resid_mid"))
        close(get("resid_mid") + get("mlp_out"), get("resid_post"))
        close(get("resid_pre"), hs[layer][real])
        if layer < N_LAYERS - 1:
            close(get("resid_post"), hs[layer + 1][real])
    assert _hook_count(lm) == hooks_before  # every hook came off


def _hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_gemma3_multimodal_model_sizes(gemma3_vlm, tokenizer):
    model = wrap_model(gemma3_vlm, tokenizer, spec="tiny-gemma3-vlm")
    assert (model.n_layers, model.d_model) == (N_LAYERS, D_MODEL)
