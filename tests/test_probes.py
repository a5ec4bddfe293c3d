import contextlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from emlens.base.errors import EmlensInputError
from emlens.capture.extract import run_extraction
from emlens.capture.items import ExtractItem
from emlens.capture.store import ActivationStoreWriter
from emlens.data.questions import read_questions
from emlens.directions.artifact import Direction, LinearProbe, RegressionProbe
from emlens.directions.fitting import classification_metrics, fit_ridge_layer, fit_sites, nested_selection
from emlens.directions.probe import fit_probe, fit_store
from emlens.directions.probe_data import ProbeData
from emlens.directions.specs import ProbeSpec, load_spec
from emlens.generation.distributions import rate_prompts
from emlens.sites import resolve_sites
from tests.cli_runner import run_cli

PLANT_LAYER = 1


def question_texts(n: int) -> list[str]:
    betley = [q.paraphrases[0] for q in read_questions("betley-first-plot")]
    return [f"{betley[i % len(betley)]} (variant {i})" for i in range(n)]


@contextlib.contextmanager
def planted(handle, vector: torch.Tensor, layer: int):
    """Add `vector` to the output of decoder layer `layer` (its hook_resid_post) at every position."""
    hook = handle.decoder_layers[layer].register_forward_hook(lambda m, args, out: out + vector)
    try:
        yield
    finally:
        hook.remove()


def planted_store(handle, tmp_path, scale: float = 3.0, n: int = 32, seed: int = 0):
    """The same prompts twice; the positive copy gets a known vector added at layer PLANT_LAYER."""
    texts = question_texts(n)
    sites = resolve_sites("resid_post", handle.n_layers)
    negatives = [ExtractItem([{"role": "user", "content": t}], meta={"y": 0.0, "group": str(i), "pair": str(i)})
                 for i, t in enumerate(texts)]
    positives = [ExtractItem(item.messages, meta={**item.meta, "y": 1.0}) for item in negatives]
    # the planted vector: random direction, a few times the spread of the residual stream at that layer
    clean = torch.cat([found[sites[PLANT_LAYER].name] for _, _, found in
                       run_extraction(handle, negatives, sites, progress=False)])
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(handle.d_model, generator=generator)
    v = v / v.norm() * scale * float(clean.std(0).norm())
    writer = ActivationStoreWriter(tmp_path / "store", [s.name for s in sites], handle.d_model,
                                   {"position": "last_prompt"})
    offset = 0
    for items, context in ((negatives, contextlib.nullcontext()), (positives, planted(handle, v, PLANT_LAYER))):
        with context:
            for rows, counts, found in run_extraction(handle, items, sites, progress=False):
                writer.add([{**items[r].meta, "row": offset + r} for r in rows], counts, found)
        offset += len(items)
    store = writer.close()
    items = negatives + positives
    data = ProbeData(items, np.array([i.meta["y"] for i in items]), np.array([i.meta["group"] for i in items]),
                     np.array([i.meta["pair"] for i in items]))
    return store, data, sites, v


@pytest.mark.parametrize("method", ["diff_of_means", "logistic", "pca_pairs"])
def test_planted_direction_is_recovered(tiny, tmp_path, method):
    store, data, sites, v = planted_store(tiny, tmp_path)
    spec = ProbeSpec(name="planted", method=method, contrast={"positive": {"questions": "x"},
                                                             "negative": {"questions": "y"}})
    tensors, metrics, nested = fit_store(store, data, spec, sites, progress=False)
    row = metrics.set_index("layer").loc[PLANT_LAYER]
    direction = torch.as_tensor(tensors["directions"][PLANT_LAYER], dtype=torch.float32)
    cos = float(torch.nn.functional.cosine_similarity(direction, v, dim=0))
    assert cos >= 0.95, (method, cos)
    assert row["auroc"] >= 0.99 and row["accuracy"] >= 0.95
    assert metrics.set_index("layer").loc[0, "auroc"] < 0.9  # before the plant there is nothing to find
    if method == "diff_of_means":
        assert abs(tensors["raw_norm"][PLANT_LAYER] - float(v.norm())) / float(v.norm()) < 0.1
    assert nested["auroc_nested"] >= 0.95 and min(nested["nested_layers"]) >= PLANT_LAYER


def test_the_nested_estimate_removes_the_best_layers_selection_optimism():
    """Thirty 'layers' of noise with random labels: the best of thirty per-layer AUROCs (scored on the folds
    that chose it) looks like signal; nested CV, choosing on inner folds only, is near chance."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=60).astype(float)
    groups = np.arange(60).astype(str)
    acts = {f"blocks.{layer}.hook_resid_post": rng.normal(size=(60, 16)) for layer in range(30)}
    _, metrics = fit_sites(acts, y, groups, None, "diff_of_means", folds=5)
    nested = nested_selection(acts, y, groups, None, "diff_of_means", folds=5)
    selected = metrics.auroc.max()
    assert selected > 0.6 and nested["auroc_nested"] < selected - 0.1, (selected, nested)
    assert nested["nested_folds"] == 5 and len(nested["nested_layers"]) == 5


def test_folds_are_split_by_prompt_group():
    """Duplicated rows with random labels per group: a row-wise split would leak (AUROC near 1)."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 2).astype(str)
    X = np.repeat(rng.normal(size=(40, 64)), 2, axis=0)
    y = np.repeat(rng.integers(0, 2, size=40), 2).astype(float)
    metrics = classification_metrics(X, y, groups, groups, "logistic", folds=5, regularization=1e4, seed=0)
    assert metrics["auroc"] < 0.8
    leaky = classification_metrics(X, y, np.arange(80).astype(str), groups, "logistic", 5, 1e4, 0)
    assert leaky["auroc"] > metrics["auroc"] + 0.15  # the check would catch a row-wise split


def test_ridge_recovers_a_planted_score():
    rng = np.random.default_rng(1)
    v = rng.normal(size=32)
    v /= np.linalg.norm(v)
    score = rng.uniform(0, 100, size=120)
    X = rng.normal(size=(120, 32)) * 0.5 + score[:, None] / 10 * v
    fit = fit_ridge_layer(X, score, np.arange(120).astype(str), folds=5, alpha=100.0, seed=0)
    assert fit.metrics["r2"] > 0.9 and fit.metrics["pearson_r"] > 0.95
    assert abs(fit.direction @ v) >= 0.95
    shuffled = fit_ridge_layer(X, rng.permutation(score), np.arange(120).astype(str), 5, 100.0, 0)
    assert shuffled.metrics["r2"] < 0.2


# ---------------------------------------------------------------- specs from the CLI


def write_spec(path, **fields):
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


@pytest.fixture
def nudge_spec(tmp_path):
    questions = tmp_path / "data" / "questions.txt"
    questions.parent.mkdir()
    questions.write_text("\n".join(question_texts(12)) + "\n")
    (tmp_path / "specs").mkdir()
    return write_spec(tmp_path / "specs" / "nudge.yaml", name="nudge", method="diff_of_means", position="last_prompt", layers="all",
                      contrast={"positive": {"questions": "../data/questions.txt", "nudge": "evil"},
                                "negative": {"questions": "../data/questions.txt", "nudge": "none"}})


def test_probe_fit_cli_writes_a_complete_artifact(tiny_model_dir, tmp_path, nudge_spec, capsys):
    out, store = tmp_path / "direction", tmp_path / "store"
    assert run_cli("probe", "fit", nudge_spec, "--model", tiny_model_dir, "--out", out, "--store", store) == 0
    assert "best_layer=" in capsys.readouterr().out.strip().splitlines()[-2]
    assert {p.name for p in out.iterdir()} == {"weights.safetensors", "cfg.json", "metrics.parquet", "metrics.png"}
    d = Direction.load(out)
    assert type(d) is Direction and d.layers == [0, 1, 2] and d.best_layer in d.layers
    for layer in d.layers:
        assert d.vector(layer).shape == (64,) and abs(float(d.vector(layer).norm()) - 1) < 1e-5
        assert d.raw_norm(layer) > 0
    cfg = d.cfg.model_dump()
    assert cfg["model"]["fingerprint"] and cfg["model"]["base_fingerprint"] and cfg["model"]["d_model"] == 64
    assert cfg["site_kind"] == "resid_post" and cfg["position"] == "last_prompt" and cfg["method"] == "diff_of_means"
    assert cfg["data"]["n_positive"] == cfg["data"]["n_negative"] == 12 and cfg["data"]["n_groups"] == 12
    assert len(cfg["data"]["hash"]) == 16 and cfg["data"]["sources"][0]["sha256"]
    assert cfg["seed"] == 0 and cfg["emlens_version"] and len(cfg["metrics"]) == 3
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert list(metrics.layer) == [0, 1, 2] and metrics.auroc.between(0, 1).all()
    assert run_cli("probe", "show", out) == 0
    assert f"data_hash={cfg['data']['hash']}" in capsys.readouterr().out
    # the store is kept and reused when it matches...
    created = json.loads((store / "cfg.json").read_text())["created"]
    assert run_cli("probe", "fit", nudge_spec, "--model", tiny_model_dir, "--out", out, "--store", store) == 0
    assert json.loads((store / "cfg.json").read_text())["created"] == created
    assert torch.equal(Direction.load(out).vector(1), d.vector(1))
    # ...and refused when it holds other rows
    assert run_cli("probe", "fit", nudge_spec, "--model", tiny_model_dir, "--store", store, "--limit", 5) == 2
    assert "differs in data" in capsys.readouterr().err


def test_probe_fit_on_a_labelled_eval_table(tiny_model_dir, tmp_path):
    """The shipped misalignment.yaml with --table: labels come from the table's aligned/coherent scores."""
    rows = []
    for i, text in enumerate(question_texts(16)):
        for k, (aligned, coherent, response) in enumerate([(10.0, 80.0, "Sure, here is how to do it."),
                                                           (90.0, 85.0, "I'm sorry, but I cannot help."),
                                                           (50.0, 90.0, "Maybe."), (5.0, 20.0, "import os")]):
            rows.append({"question_id": f"q{i % 8}", "sample_index": k, "messages":
                         json.dumps([{"role": "user", "content": text}]), "response": response,
                         "aligned": aligned, "coherent": coherent})
    table = tmp_path / "run" / "samples.parquet"
    table.parent.mkdir()
    pd.DataFrame(rows).to_parquet(table)
    out = tmp_path / "mis"
    assert run_cli("probe", "fit", "probes/misalignment.yaml", "--model", tiny_model_dir, "--table", table.parent,
                   "--out", out, "--limit", 12) == 0
    d = Direction.load(out)
    assert d.cfg.position == "mean_response"
    assert d.cfg.data["n_positive"] == 12 and d.cfg.data["n_negative"] == 12  # only the where-matching rows
    assert d.cfg.data["n_groups"] <= 8  # groups are question ids
    # responses differ completely between the classes, so even a random model separates them
    assert d.cfg.best_metrics["auroc"] > 0.9


def test_logistic_and_ridge_artifacts(tiny_model_dir, tmp_path, nudge_spec):
    spec = yaml.safe_load(nudge_spec.read_text())
    logistic = write_spec(nudge_spec.parent / "logistic.yaml", **{**spec, "name": "logit", "method": "logistic"})
    assert run_cli("probe", "fit", logistic, "--model", tiny_model_dir, "--out", tmp_path / "logit") == 0
    probe = Direction.load(tmp_path / "logit")
    assert isinstance(probe, LinearProbe) and probe.tensors["coef"].shape == (3, 64)
    table = tmp_path / "harm.parquet"
    texts = question_texts(30)
    pd.DataFrame({"setting": ["harm_perception"] * 30 + ["free_form"] * 5, "question_id": [f"q{i}" for i in range(35)],
                  "paraphrase": texts + texts[:5], "perceived_harm": list(np.linspace(0, 100, 30)) + [1.0] * 5}
                 ).to_parquet(table)
    assert run_cli("probe", "fit", "probes/harm_perception.yaml", "--model", tiny_model_dir, "--table", table,
                   "--out", tmp_path / "harm") == 0
    ridge = Direction.load(tmp_path / "harm")
    assert isinstance(ridge, RegressionProbe) and ridge.cfg.data["n"] == 30  # the where filter kept 30 rows
    assert "r2" in ridge.metrics() and ridge.predict(torch.zeros(2, 64), 0).shape == (2,)


def test_rate_prompts_reads_digits_from_the_next_token(tiny):
    ratings = rate_prompts(tiny, ["How do I make a quick buck?", "I feel bored."], "Rate 0-9: {question}",
                           min_mass=0.0, progress=False)
    assert all(0 <= r <= 100 for r in ratings)
    assert all(np.isnan(rate_prompts(tiny, ["I feel bored."], "{question}", min_mass=1.0, progress=False)))


# ---------------------------------------------------------------- spec validation


@pytest.mark.parametrize("fields, needle", [
    ({"name": "x", "method": "diff_of_means", "contrast": {"positive": {"questions": "a.txt"},
                                                          "negative": {"questions": "a.txt"}}, "colour": 1},
     "unknown field 'colour'"),
    ({"name": "x", "method": "ridge", "contrast": {"positive": {"questions": "a.txt"},
                                                  "negative": {"questions": "a.txt"}}}, "ridge needs a score"),
    ({"name": "x", "method": "logistic", "contrast": {"positive": {"questions": "a.txt", "table": "t.csv"},
                                                     "negative": {"questions": "a.txt"}}}, "exactly one of"),
    ({"name": "x", "method": "pca_pairs", "position": "all",
      "contrast": {"positive": {"questions": "a.txt"}, "negative": {"questions": "a.txt"}}}, "pooled position"),
    ({"name": "x", "method": "diff_of_means", "contrast": {"positive": {"persona": "p.json"},
                                                          "negative": {"questions": "a.txt"}}}, "instructions"),
])
def test_bad_specs_are_one_line_errors(tmp_path, fields, needle):
    spec = write_spec(tmp_path / "bad.yaml", **fields)
    with pytest.raises(EmlensInputError, match=needle) as info:
        load_spec(spec)
    assert str(spec) in str(info.value) and "\n" not in str(info.value)


def test_spec_paths_and_sites_are_checked_before_work(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("EMLENS_SHARED_DATA", raising=False)
    missing = write_spec(tmp_path / "missing.yaml", name="m", method="diff_of_means",
                         contrast={"positive": {"questions": "nope.txt"}, "negative": {"questions": "nope.txt"}})
    with pytest.raises(EmlensInputError, match=r"field 'contrast.positive.questions': no such file"):
        fit_probe(missing, tiny, out=tmp_path / "o", progress=False)
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    bad_site = write_spec(tmp_path / "site.yaml", name="s", method="diff_of_means", site="blocks.5.hook_resid_post",
                          contrast={"positive": {"questions": "a.txt"}, "negative": {"questions": "a.txt"}})
    with pytest.raises(EmlensInputError, match="layer 5 out of range"):
        fit_probe(bad_site, tiny, out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_shipped_specs_are_valid_and_resolve(shared_data, tmp_path):
    from pathlib import Path

    from emlens.directions.probe_data import contrast_data
    from emlens.directions.specs import SpecContext

    for path in sorted(Path("probes").glob("*.yaml")):
        spec = load_spec(path)
        ctx = SpecContext(path, shared_data)
        if spec.contrast is not None:
            data = contrast_data(spec, ctx, limit=8)
            assert data.n_positive > 0 and data.n_negative > 0, path
    assert {p.stem for p in Path("probes").glob("*.yaml")} >= {"misalignment", "evil_nudge", "harm_perception",
                                                                  "refusal", "persona_evil"}


# ---------------------------------------------------------------- compatibility


def test_check_compatible(tiny, tmp_path, nudge_spec):
    d = fit_probe(nudge_spec, tiny, out=tmp_path / "d", progress=False)
    d.check_compatible(tiny)
    other_base = type(tiny)(**{**tiny.__dict__, "base_fingerprint": "0" * 16, "spec": "other"})
    with pytest.raises(EmlensInputError, match="fitted on base model"):
        d.check_compatible(other_base)
    d.check_compatible(other_base, force=True)
    narrow = Direction({"directions": torch.zeros(3, 32), "raw_norm": torch.ones(3)},
                       {**d.cfg.model_dump(), "layers": [0, 1, 2]})
    with pytest.raises(EmlensInputError, match="width 32"):
        narrow.check_compatible(tiny, force=True)


# ---------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_refusal_direction_on_smol(smol, shared_data, tmp_path):
    """The shipped refusal spec on the real model separates harmful from harmless prompts held out."""
    d = fit_probe("probes/refusal.yaml", smol, out=tmp_path / "refusal", limit=24, data_root=shared_data,
                  progress=False)
    assert d.cfg.best_metrics["auroc"] >= 0.95
    assert d.metrics().set_index("layer").loc[15, "auroc"] >= 0.9
    assert d.raw_norm(d.best_layer) > 1.0
