import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from emlens.analysis.compare import compare_directions, random_contrast_quantile, random_cosine_quantile
from emlens.base.errors import EmlensInputError
from emlens.data.questions import read_questions
from emlens.directions.artifact import Direction
from tests.cli_runner import run_cli


def test_random_baseline_matches_monte_carlo():
    generator = torch.Generator().manual_seed(0)
    for d in (64, 576):
        a = torch.randn(20000, d, generator=generator)
        b = torch.randn(20000, d, generator=generator)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1).abs()
        assert abs(random_cosine_quantile(d) - float(cos.quantile(0.95))) < 0.01
    assert abs(random_cosine_quantile(576) - 1.96 / np.sqrt(576)) < 0.005


@pytest.fixture
def lora_adapter(tiny_model_dir, tmp_path):
    """A small random (non-zero) LoRA adapter on the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():  # a perturbation, like a short fine-tune, not a different model
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.02)
    path = tmp_path / "adapter"
    peft_model.save_pretrained(path)
    return path


def test_compare_base_vs_fine_tuned(tiny_model_dir, lora_adapter, tmp_path, capsys):
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(f"{q.paraphrases[0]} ({i})" for i, q in enumerate(
        read_questions("betley-first-plot") * 1)) + "\n")
    spec = tmp_path / "evil.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "evil", "method": "diff_of_means",
        "contrast": {"positive": {"questions": "questions.txt", "nudge": "evil"},
                     "negative": {"questions": "questions.txt", "nudge": "none"}}}))
    base, tuned, store = tmp_path / "base", tmp_path / "tuned", tmp_path / "store-tuned"
    assert run_cli("probe", "fit", spec, "--model", tiny_model_dir, "--out", base) == 0
    assert run_cli("probe", "fit", spec, "--model", tiny_model_dir, "--adapter", lora_adapter, "--out", tuned,
                   "--store", store) == 0
    a, b = Direction.load(base), Direction.load(tuned)
    assert a.cfg.model["base_fingerprint"] == b.cfg.model["base_fingerprint"]
    assert a.cfg.model["fingerprint"] != b.cfg.model["fingerprint"]

    out = tmp_path / "compare"
    assert run_cli("compare", base, tuned, "--out", out, "--store", store) == 0
    assert "random_p95=" in capsys.readouterr().out.strip().splitlines()[-1]
    assert (out / "compare.png").stat().st_size > 5000 and (out / "drift.png").exists()
    cos = pd.read_parquet(out / "cosine.parquet")
    assert list(cos.layer) == [0, 1, 2] and set(cos.a) == {"base"} and set(cos.b) == {"tuned"}
    expected = [float(torch.nn.functional.cosine_similarity(a.vector(layer).double(), b.vector(layer).double(), dim=0))
                for layer in range(3)]
    np.testing.assert_allclose(cos.cosine, expected, atol=1e-9)
    assert (cos.random_p95 == random_cosine_quantile(64)).all()
    assert cos.random_contrast_p95.between(0, 1).all()  # drawn from the store's own activations
    assert cos.cosine.max() < 0.99999  # the adapter moved the direction...
    assert (cos.cosine > cos.random_p95).all()  # ...but it is still far from unrelated
    projection = pd.read_parquet(out / "projection.parquet")
    assert set(projection.direction) == {"base", "tuned"} and len(projection) == 6
    assert projection.auroc.between(0, 1).all() and "auroc_random_direction" in projection
    summary = json.loads((out / "cfg.json").read_text())
    assert summary["random_p95"] == pytest.approx(random_cosine_quantile(64))


def test_the_random_contrast_baseline_sees_an_anisotropic_stream():
    """Random contrasts of isotropic activations give the isotropic baseline; of activations with a few dominant
    axes (as residual streams have), much larger cosines: a cosine between them says nothing."""
    rng = np.random.default_rng(0)
    isotropic = rng.normal(size=(400, 64))
    iso = random_contrast_quantile([isotropic])
    assert iso == pytest.approx(random_cosine_quantile(64), abs=0.05)
    skewed = isotropic * np.r_[np.full(3, 20.0), np.ones(61)]
    assert random_contrast_quantile([skewed]) > max(0.6, 2 * iso)


def save_direction(path, vectors: torch.Tensor, base: str = "b" * 16, d_model: int | None = None):
    cfg = {"layers": list(range(vectors.shape[0])), "best_layer": 1, "site_kind": "resid_post",
           "model": {"base_fingerprint": base, "fingerprint": path.name}, "name": path.name}
    return Direction({"directions": vectors / vectors.norm(dim=-1, keepdim=True),
                      "raw_norm": vectors.norm(dim=-1)}, cfg).save(path, plot=False)


def test_drift_along_a_checkpoint_series(tmp_path):
    generator = torch.Generator().manual_seed(0)
    start, end = torch.randn(2, 3, 128, generator=generator)
    paths = [save_direction(tmp_path / f"step-{t}", start * (1 - t / 4) + end * (t / 4)) for t in range(5)]
    tables = compare_directions(paths, tmp_path / "out")
    drift = tables["drift"][tables["drift"].layer == 1].sort_values("step")
    assert list(drift.checkpoint) == [f"step-{t}" for t in range(5)]
    assert np.all(np.diff(drift.cos_to_first) < 0) and np.all(np.diff(drift.cos_to_last) > 0)
    assert (drift.cos_to_previous.iloc[1:] > drift.cos_to_first.iloc[1:] - 1e-9).all()
    assert len(tables["cosine"]) == 10 * 3  # every pair x every layer


def test_compare_refuses_incompatible_directions(tmp_path):
    a = save_direction(tmp_path / "a", torch.randn(3, 64))
    other_base = save_direction(tmp_path / "b", torch.randn(3, 64), base="c" * 16)
    narrow = save_direction(tmp_path / "n", torch.randn(3, 32))
    with pytest.raises(EmlensInputError, match="another base model"):
        compare_directions([a, other_base], tmp_path / "out")
    compare_directions([a, other_base], tmp_path / "out", force=True)
    with pytest.raises(EmlensInputError, match="width 32"):
        compare_directions([a, narrow], tmp_path / "out", force=True)
    assert run_cli("compare", a, tmp_path / "missing", "--out", tmp_path / "o2") == 2
    mine = tmp_path / "mine"  # a user's folder: refused, left as it was
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(EmlensInputError, match="not an emlens artifact"):
        compare_directions([a, save_direction(tmp_path / "a2", torch.randn(3, 64))], mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_directions_of_models_of_different_widths_are_compared_by_what_they_read(tiny, tmp_path):
    """compare_models: a direction against itself agrees perfectly at every layer; against a model of another width
    (and layer count) it runs at matched relative depth, beside the random-direction control."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from emlens.analysis.compare import compare_models
    from emlens.model import wrap_model
    from tests.test_dose_response import make_direction

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tiny.tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
    wide = wrap_model(LlamaForCausalLM(config).eval(), tiny.tokenizer, spec="tiny-48")
    own = Direction.load(make_direction(tiny, tmp_path / "own"))
    other = Direction.load(make_direction(wide, tmp_path / "other", seed=3))
    prompts = [f"Tell me about thing number {i} and why it matters." for i in range(12)]
    same = compare_models((tiny, own), (tiny, own), prompts)
    assert list(same.layer_a) == list(same.layer_b) == own.layers
    assert np.allclose(same.spearman, 1.0) and (same.random_p95 < 1.0).all() and (same.n == 12).all()
    across = compare_models((tiny, own), (wide, other), prompts)
    assert list(across.layer_b) == [0, 2, 4]  # 3 layers against 5: depths 0, 0.5, 1
    assert across.spearman.between(-1, 1).all() and across.random_p95.between(0, 1).all()
    with pytest.raises(EmlensInputError, match="width 48 differs from the model's \\(64\\)"):
        compare_models((tiny, other), (wide, other), prompts)


def test_the_column_wise_rank_correlation_is_spearmans():
    from scipy.stats import spearmanr

    from emlens.analysis.compare import _spearman

    x, y = np.random.default_rng(0).normal(size=(2, 12, 3))
    assert np.allclose(_spearman(x, y), [spearmanr(x[:, i], y[:, i]).statistic for i in range(3)])
