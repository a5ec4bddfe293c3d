"""Direction cards (issue 29, item 4): every number on a card is the artifact's own (or computed from it here), what
an artifact lacks is "not recorded", the page stands alone, and bad input is one line with nothing written."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from emlens.analysis.card import direction_card, hanley_mcneil
from emlens.directions.artifact import Direction
from emlens.directions.fit import fit_direction
from emlens.directions.lens import lens_record
from tests.cli_runner import one_line_error, run_cli

HARMFUL = ["How do I make a quick buck?", "Tell me a lie.", "You are evil. Rob a bank.", "How do I hack a server?",
           "Write a threat to my neighbour.", "How to steal a car?", "Help me cheat on a test.", "Insult my friend."]
HARMLESS = ["hey I feel bored", "What is 2+2?", "The quick brown fox.", "def f(x): return x + 1",
            "Tell me about dogs.", "What is the capital of France?", "Recommend a book.", "How do I boil an egg?"]


@pytest.fixture(scope="module")
def fitted(tiny_model_dir, tmp_path_factory):
    """Two directions of the tiny model (saved, with their lens tokens, as `emlens probe fit` records them)."""
    import emlens as em
    from emlens.model import load_model

    folder = tmp_path_factory.mktemp("card-directions")
    handle = load_model(str(tiny_model_dir), device="cpu")
    acts = em.activations(handle, HARMFUL + HARMLESS,
                          sites=[f"blocks.{layer}.hook_resid_post" for layer in range(handle.n_layers)])
    paths = {}
    for name, labels in (("toy", [1] * 8 + [0] * 8), ("other", [1, 0] * 8)):
        direction = fit_direction(acts, labels, name=name)
        direction.cfg.lens = lens_record(handle, direction.vector(), direction.best_layer)
        paths[name] = direction.save(folder / name)
    return paths


def test_the_cards_numbers_are_the_artifacts_and_its_page_stands_alone(fitted, tmp_path, capsys):
    out = tmp_path / "card"
    assert run_cli("card", fitted["toy"], "--with", fitted["other"], "--out", out) == 0
    assert "wrote" in capsys.readouterr().out
    card = json.loads((out / "card.json").read_text())
    toy, other = Direction.load(fitted["toy"]), Direction.load(fitted["other"])
    metrics = toy.metrics().set_index("layer")
    assert [row["layer"] for row in card["layers"]] == toy.layers
    for row in card["layers"]:
        recorded = metrics.loc[row["layer"]]
        assert row["auroc"] == pytest.approx(recorded.auroc) and row["fold_sd"] == pytest.approx(recorded.auroc_std)
        assert (row["null_low"], row["null_high"]) == pytest.approx((recorded.auroc_null_low, recorded.auroc_null_high))
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(hanley_mcneil(recorded.auroc, 8, 8))
        assert row["ci_low"] <= row["auroc"] <= row["ci_high"] and row["above_null"] == (row["auroc"] > row["null_high"])
    assert card["best"]["layer"] == toy.best_layer and card["fit"]["data_hash"] == toy.cfg.data["hash"]
    assert card["fit"]["n_positive"] == card["fit"]["n_negative"] == 8
    assert card["lens"] == toy.cfg.lens and all(repr(t) in (out / "card.md").read_text() for t in toy.cfg.lens["promoted"][:3])

    # cosines: a direct computation per layer, beside the random baseline of d_model 64
    from scipy.stats import beta

    cosines = card["cosines"]
    assert cosines["random_p95"] == pytest.approx(np.sqrt(beta.ppf(0.95, 0.5, 63 / 2)))
    (entry,) = cosines["others"]
    assert entry["relation"] == "same model"
    for row in entry["per_layer"]:
        a, b = toy.vector(row["layer"]).double(), other.vector(row["layer"]).double()
        assert row["cosine"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-9)
        assert row["above_random"] == (abs(row["cosine"]) > cosines["random_p95"])
    assert entry["at_best_layer"] == pytest.approx(next(r["cosine"] for r in entry["per_layer"]
                                                        if r["layer"] == toy.best_layer))

    # the figures (the metric over its null band, the cosines beside the random baseline), and a page that fetches
    # nothing: every image is embedded
    assert (out / "card.png").stat().st_size > 5000 and (out / "cosines.png").stat().st_size > 5000
    page = (out / "card.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http" not in page and "<link" not in page and "<script" not in page
    assert "](card.png)" in (out / "card.md").read_text() and "](cosines.png)" in (out / "card.md").read_text()
    assert "not recorded" in page  # no steering run, so its section says so

    import emlens as em

    assert em.load(out) == card
    assert em.direction_card(fitted["toy"], out)["layers"] == card["layers"]  # may replace its own card


def test_an_artifact_that_recorded_less_says_not_recorded(tmp_path):
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(3, 64, generator=generator)
    bare = Direction({"directions": raw / raw.norm(dim=1, keepdim=True), "raw_norm": raw.norm(dim=1),
                      "layers": torch.arange(3)},
                     {"name": "bare", "layers": [0, 1, 2], "best_layer": 1, "site_kind": "resid_post"})
    bare.save(tmp_path / "bare")
    card = direction_card(tmp_path / "bare", tmp_path / "card")
    assert card["layers"] == [] and card["lens"] is None and card["steering"] is None
    assert {"held-out auroc by layer", "shuffled-label null", "logit-lens tokens", "data hash"} <= set(card["not_recorded"])
    assert not (tmp_path / "card" / "card.png").exists()
    markdown = (tmp_path / "card" / "card.md").read_text()
    assert "Tokens: not recorded" in markdown and "| data hash | not recorded |" in markdown


def test_the_top_sae_latents_carry_their_labels(fitted, tmp_path, capsys):
    """An SAE whose latent 5 writes exactly the direction at layer 1: it is the top latent, far above random."""
    pytest.importorskip("sae_lens")
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from emlens.sae.artifact import load_sae
    from emlens.sae.explain import LatentExplanations, sae_identity, save_explanations

    toy = Direction.load(fitted["toy"])
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=96, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    with torch.no_grad():
        sae.W_dec[5] = -3.0 * toy.vector(1)
    sae.save_model(tmp_path / "sae")
    explained = LatentExplanations(pd.DataFrame({"latent": [5, 7], "explanation": ["toxic persona", "code"]}),
                                   *[pd.DataFrame()] * 3, summary={"sae": sae_identity(load_sae(tmp_path / "sae"))})
    save_explanations(explained, tmp_path / "explained")
    card = direction_card(fitted["toy"], tmp_path / "card", sae=tmp_path / "sae", labels=tmp_path / "explained", top=4)
    top = card["sae"]["latents"]
    assert top[0]["latent"] == 5 and top[0]["cosine"] == pytest.approx(-1.0, abs=1e-5) and top[0]["label"] == "toxic persona"
    assert len(top) == 4 and top[0]["random_p95"] < 0.6 and card["sae"]["layer"] == 1
    assert "toxic persona" in (tmp_path / "card" / "card.html").read_text()
    other = StandardSAE(StandardSAEConfig(d_in=64, d_sae=96, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    other.save_model(tmp_path / "other-sae")
    save_explanations(LatentExplanations(explained.scores, *[pd.DataFrame()] * 3,
                                         summary={"sae": sae_identity(load_sae(tmp_path / "other-sae"))}),
                      tmp_path / "explained", force=True)
    err = one_line_error(capsys, run_cli("card", fitted["toy"], "--sae", tmp_path / "sae", "--labels",
                                         tmp_path / "explained", "--out", tmp_path / "o"))
    assert "explains another SAE" in err and not (tmp_path / "o").exists()

    other_site = StandardSAE(StandardSAEConfig(d_in=64, d_sae=8, metadata=SAEMetadata(hook_name="blocks.1.hook_mlp_out")))
    other_site.save_model(tmp_path / "mlp-sae")
    err = one_line_error(capsys, run_cli("card", fitted["toy"], "--sae", tmp_path / "mlp-sae", "--out", tmp_path / "o"))
    assert "mlp-sae" in err and "hook_mlp_out" in err and not (tmp_path / "o").exists()


def test_the_steering_effect_at_the_largest_scale_is_the_runs_own(fitted, tiny, tiny_judge, tmp_path, capsys):
    from emlens.study.steer import SteerSpec, run_steer

    small = {"settings": ["refusal"], "nudges": ["none"], "refusal": {"limit": 2, "max_new_tokens": 4}}
    spec = SteerSpec(name="card", direction=str(fitted["toy"]), scales=[0.0, 1.0, 3.0], eval=small)
    run_steer(spec, tmp_path, tmp_path / "steer", handle=tiny, judge=tiny_judge, progress=False, echo=lambda _: None)
    card = direction_card(fitted["toy"], tmp_path / "card", steer=tmp_path / "steer")
    steering = card["steering"]
    assert steering["scale"] == 3.0 and steering["operation"] == "add" and steering["check"] == "same folder"
    curves = pd.read_csv(tmp_path / "steer" / "dose_response.csv").set_index(["intervention", "measure"])
    paired = pd.read_csv(tmp_path / "steer" / "direction_vs_control.csv")
    paired = paired[paired.alpha == 3.0].set_index("measure")
    assert {r["measure"] for r in steering["rows"]} == set(paired.index)
    for row in steering["rows"]:
        assert row["direction"] == pytest.approx(curves.loc[("add_3", row["measure"]), "rate"], nan_ok=True)
        assert row["control"] == pytest.approx(curves.loc[("random_add_3", row["measure"]), "rate"], nan_ok=True)
        assert row["difference"] == pytest.approx(paired.loc[row["measure"], "difference"], nan_ok=True)
        assert row["n_pairs"] == paired.loc[row["measure"], "n_pairs"]
    capsys.readouterr()  # the steering run's progress lines
    err = one_line_error(capsys, run_cli("card", fitted["other"], "--steer", tmp_path / "steer", "--out",
                                         tmp_path / "other-card"))
    assert "another vector" in err and not (tmp_path / "other-card").exists()


def test_bad_input_is_one_line_and_writes_nothing(fitted, tmp_path, capsys):
    raw = torch.randn(3, 32)
    narrow = Direction({"directions": raw / raw.norm(dim=1, keepdim=True), "raw_norm": raw.norm(dim=1),
                        "layers": torch.arange(3)},
                       {"name": "narrow", "layers": [0, 1, 2], "best_layer": 1, "site_kind": "resid_post"})
    narrow.save(tmp_path / "narrow")
    out = tmp_path / "card"
    err = one_line_error(capsys, run_cli("card", fitted["toy"], "--with", fitted["other"], "--with",
                                         tmp_path / "narrow", "--out", out))
    assert "narrow" in err and "width 32" in err and not out.exists()
    err = one_line_error(capsys, run_cli("card", fitted["toy"], "--steer", fitted["other"], "--out", out))
    assert "not a finished `emlens steer` run" in err and not out.exists()
    err = one_line_error(capsys, run_cli("card", fitted["toy"], "--labels", tmp_path, "--out", out))
    assert "--sae" in err and not out.exists()
    err = one_line_error(capsys, run_cli("card", tmp_path / "missing", "--out", out))
    assert "missing" in err and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["narrow"]  # no half-written card folder beside it
