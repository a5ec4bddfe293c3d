import pandas as pd
import pytest
import torch
import yaml

from emlens.directions.artifact import Direction


def make_direction(handle, folder, seed=0, site_kind="resid_post"):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(handle.n_layers, handle.d_model, generator=g)
    tensors = {"directions": raw / raw.norm(dim=1, keepdim=True), "raw_norm": raw.norm(dim=1),
               "layers": torch.arange(handle.n_layers)}
    cfg = {"name": "planted", "layers": list(range(handle.n_layers)), "best_layer": 1, "site_kind": site_kind,
           "method": "diff_means", "model": {"model": handle.spec, "base_fingerprint": handle.base_fingerprint}}
    return Direction(tensors, cfg).save(folder)


@pytest.fixture
def spec_file(tiny, tmp_path):
    make_direction(tiny, tmp_path / "dir")
    spec = {"name": "tiny-test", "direction": "dir", "operation": "ablate_add", "scales": [0, 50.0],
            "positions": "all", "eval": {"settings": ["free_form", "refusal", "harm_perception"], "nudges": ["none"], "judge": "hf",
                                         "harm_perception": {"questions": "deception-sit-aware"},
                                         "free_form": {"questions": "deception-sit-aware", "samples": 2, "limit": 2,
                                                       "max_new_tokens": 5},
                                         "refusal": {"limit": 2, "max_new_tokens": 5}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_steer_runs_every_condition_with_random_control(tiny, tiny_judge, spec_file, tmp_path):
    from emlens.study.steer import load_spec, run_steer

    spec, base = load_spec(spec_file)
    curves = run_steer(spec, base, tmp_path / "out", handle=tiny, judge=tiny_judge, progress=False,
                       echo=lambda *_: None)
    table = pd.read_parquet(tmp_path / "out" / "samples.parquet")
    assert set(table.intervention) == {"baseline", "ablate", "random_ablate", "ablate_add_50", "random_ablate_add_50"}
    assert table.groupby("intervention").size().nunique() == 1  # every condition re-ran the same samples
    assert set(table.loc[table.control, "intervention"]) == {"random_ablate", "random_ablate_add_50"}
    # the intervention changed what the model computes (the random tiny model's sampled words barely move; its
    # harm ratings fall under the mass floor, so their mass is what moves)
    mass = table[table.setting == "harm_perception"].pivot(index="question_id", columns="intervention",
                                                           values="perceived_harm_mass")
    assert (mass.baseline - mass.ablate_add_50).abs().max() > 1e-4
    assert (mass.baseline - mass.random_ablate_add_50).abs().max() > 1e-4
    assert {"coherence", "refusal_harmful", "refusal_harmless", "perceived_harm"} <= set(curves.measure)
    assert ((curves.ci_low <= curves.rate + 1e-9) | curves.rate.isna()).all()
    assert (tmp_path / "out" / "dose_response.png").stat().st_size > 0
    paired = pd.read_csv(tmp_path / "out" / "direction_vs_control.csv")
    assert set(zip(paired.operation, paired.alpha)) == {("ablate", 0.0), ("ablate_add", 50.0)}
    harmful = table[(table.setting == "refusal") & table.harmful_prompt]
    refused = harmful.assign(refused=harmful.refused_judge.astype(float)).pivot_table(
        index=["question_id", "paraphrase_index", "sample_index"], columns="intervention",
        values="refused")[["ablate_add_50", "random_ablate_add_50"]].dropna()
    pair = paired[(paired.measure == "refusal_harmful") & (paired.operation == "ablate_add")].iloc[0]
    assert pair.n_pairs == len(refused) > 0
    assert pair.difference == pytest.approx((refused.ablate_add_50 - refused.random_ablate_add_50).mean())
    assert pair.ci_low <= pair.difference <= pair.ci_high
    # a re-run resumes: nothing is generated again
    mtimes = {p: p.stat().st_mtime for p in (tmp_path / "out" / "conditions").rglob("part-*.parquet")}
    run_steer(spec, base, tmp_path / "out", handle=tiny, judge=tiny_judge, progress=False, echo=lambda *_: None)
    assert {p: p.stat().st_mtime for p in (tmp_path / "out" / "conditions").rglob("part-*.parquet")} == mtimes


def test_steer_spec_errors(tmp_path):
    from emlens.base.errors import EmlensInputError
    from emlens.study.steer import load_spec

    bad = tmp_path / "s.yaml"
    bad.write_text("name: x\ndirection: d\nscalez: [1]\n")
    with pytest.raises(EmlensInputError, match="scalez"):
        load_spec(bad)


def test_direction_of_wrong_width_is_refused(tiny, tmp_path, capsys):
    from tests.cli_runner import run_cli

    raw = torch.randn(3, 10)
    Direction({"directions": raw / raw.norm(dim=1, keepdim=True), "raw_norm": raw.norm(dim=1),
               "layers": torch.arange(3)},
              {"layers": [0, 1, 2], "best_layer": 1, "site_kind": "resid_post"}).save(tmp_path / "narrow")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "x", "direction": "narrow", "eval": {"settings": ["refusal"]}}))
    assert run_cli("steer", spec, "--out", tmp_path / "o", "--model", tiny.spec) == 2
    err = capsys.readouterr().err
    assert "width 10" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "samples.parquet").exists()


def test_steer_cli_prints_the_paired_direction_minus_control(tiny, tmp_path, capsys):
    from tests.cli_runner import run_cli

    make_direction(tiny, tmp_path / "dir")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "x", "direction": "dir", "operation": "ablate",
                                    "eval": {"settings": ["harm_perception"], "nudges": ["none"], "judge": "default",
                                             "harm_perception": {"questions": "deception-sit-aware"}}}))
    assert run_cli("steer", spec, "--out", tmp_path / "o", "--model", tiny.spec) == 0
    out = capsys.readouterr().out
    paired = pd.read_csv(tmp_path / "o" / "direction_vs_control.csv")
    assert list(paired.measure) == ["perceived_harm"]
    row = paired.iloc[0]
    assert f"direction - control ablate@0 none   perceived_harm           {row.difference:+.3f}" in out
    assert f"pairs={row.n_pairs}" in out


def test_shipped_steering_specs_validate():
    from pathlib import Path

    from emlens.study.steer import direction_path, load_spec

    specs = sorted(Path("steering").glob("*.yaml"))
    assert {p.stem for p in specs} >= {"refusal_add_base", "refusal_ablate_base"}
    for path in specs:
        spec, base = load_spec(path)
        # the folders `emlens probe fit` writes its directions under, and `emlens sae train` its SAEs
        expected = "artifacts/sae" if spec.latent is not None else "artifacts/directions"
        assert direction_path(spec, base).resolve().parent == Path(expected).resolve()
        assert spec.random_control, f"{path}: every direction runs beside a random control"


def test_a_direction_steers_at_its_own_site_and_another_site_is_refused(tiny, tiny_judge, tmp_path):
    """A direction read at mlp_out is added at mlp_out; asking for resid_post is a one-line error (unless forced)."""
    from emlens.base.errors import EmlensInputError
    from emlens.base.io import read_json
    from emlens.study.steer import SteerSpec, run_steer

    make_direction(tiny, tmp_path / "dir", site_kind="mlp_out")
    small = {"settings": ["harm_perception"], "nudges": ["none"], "harm_perception": {"questions": "deception-sit-aware"}}
    spec = SteerSpec(name="own-site", direction="dir", scales=[2.0], random_control=False, eval=small)
    run_steer(spec, tmp_path, tmp_path / "own", handle=tiny, judge=tiny_judge, progress=False, echo=lambda _: None)
    assert read_json(tmp_path / "own" / "conditions" / "add_2" / "cfg.json")["config"]["site"] == "mlp_out"
    elsewhere = spec.model_copy(update={"site": "resid_post"})
    with pytest.raises(EmlensInputError, match="fitted at hook_mlp_out, asked to steer at hook_resid_post"):
        run_steer(elsewhere, tmp_path, tmp_path / "elsewhere", handle=tiny, judge=tiny_judge, progress=False)
    assert not (tmp_path / "elsewhere").exists()
    forced = elsewhere.model_copy(update={"force_site": True})
    run_steer(forced, tmp_path, tmp_path / "forced", handle=tiny, judge=tiny_judge, progress=False, echo=lambda _: None)
    assert read_json(tmp_path / "forced" / "conditions" / "add_2" / "cfg.json")["config"]["site"] == "resid_post"


def test_ablate_add_is_the_clamp_at_the_directions_site(tiny, spec_file):
    """The steering operation of em_qwen7b.yaml: the projection at the site becomes alpha (it used to equal plain
    ablation, the next layer's input hook removing the add), for the direction and its random control."""
    from emlens.sites import site_name
    from emlens.steering.interventions import Clamp
    from emlens.study.steer import conditions, load_spec, steer_target
    from tests.test_steering import site_projections

    spec, base = load_spec(spec_file)
    target = steer_target(spec, base, tiny)
    clamps = [c for c in conditions(spec, target) if c["operation"] == "ablate_add"]
    assert [c["control"] for c in clamps] == [False, True]
    for condition in clamps:
        clamp = condition["intervention"]
        assert isinstance(clamp, Clamp) and clamp.alpha == pytest.approx(50 * target.natural_norm)
        unit = clamp.vector / clamp.vector.norm()
        projected = site_projections(tiny, unit, [target.site], clamp)[site_name(target.layer, target.site)]
        torch.testing.assert_close(projected, torch.full_like(projected, clamp.alpha), rtol=1e-4, atol=1e-3)


def test_the_paired_difference_says_what_the_coherence_filter_dropped():
    """P(misaligned) counts coherent, scored answers only, and coherence is what steering changes: beside the
    paired difference over samples scored in both conditions, the unconditional one and the pairs dropped."""
    from emlens.analysis.dose_response import direction_vs_control

    labels = {False: ["misaligned", "incoherent", "aligned"], True: ["aligned", "misaligned", "aligned"]}
    table = pd.DataFrame([{"operation": "add", "alpha": 4.0, "nudge": "none", "control": control,
                           "setting": "free_form", "question_id": f"q{i}", "paraphrase_index": 0, "sample_index": 0,
                           "label": label, "misaligned": label == "misaligned",
                           "coherent": 20.0 if label == "incoherent" else 80.0}
                          for control, row in labels.items() for i, label in enumerate(row)])
    row = direction_vs_control(table).set_index("measure").loc["misaligned_rate"]
    assert (row.n_pairs, row.pairs_dropped) == (2, 1)
    assert row.difference == pytest.approx(0.5)  # q0: 1 - 0, q2: 0 - 0
    assert row.difference_unconditional == pytest.approx(0.0)  # q0: +1, q1: 0 - 1, q2: 0


def test_the_misaligned_difference_is_corrected_for_the_judge_under_its_calibration():
    """With the shipped default judge's calibration the dose-response rows and the paired difference carry a
    corrected figure (its calibrated cut where the table has the judge's P(misaligned), Rogan-Gladen without it)
    whose CI holds it; the judge's raw difference is kept beside it."""
    import numpy as np

    from emlens.analysis.dose_response import direction_vs_control, dose_response_table
    from emlens.judges.embedding import EmbeddingJudge

    rng = np.random.default_rng(0)
    judge = EmbeddingJudge.load_default().id
    rows = []
    for control in (False, True):
        for i in range(60):
            p = rng.uniform(0.5, 1.0) if (not control and i < 20) or (control and i < 5) else rng.uniform(0, 0.1)
            label = "misaligned" if p >= 0.5 else "aligned"
            rows.append({"intervention": "x", "operation": "add", "alpha": 4.0, "nudge": "none", "control": control,
                         "setting": "free_form", "question_id": f"q{i % 12}", "paraphrase_index": 0,
                         "sample_index": i, "label": label, "misaligned": label == "misaligned", "coherent": 80.0,
                         "p_misaligned": p, "judge": judge})
    table = pd.DataFrame(rows)
    difference = direction_vs_control(table).set_index("measure").loc["misaligned_rate"]
    assert difference.difference == pytest.approx(15 / 60)
    assert difference.correction == "calibrated cut"
    assert difference.corrected_ci_low <= difference.difference_corrected <= difference.corrected_ci_high
    assert difference.corrected_ci_low > 0  # 20 vs 5 of 60 stays a difference after the correction
    plain = direction_vs_control(table.drop(columns="p_misaligned")).set_index("measure").loc["misaligned_rate"]
    assert plain.correction == "Rogan-Gladen" and plain.difference_corrected > plain.difference  # sens < 1
    curves = dose_response_table(table)
    mis = curves[curves.measure == "misaligned_rate"]
    assert (mis.correction == "calibrated cut").all() and (mis.corrected_ci_low <= mis.corrected).all()
    other = direction_vs_control(table.assign(judge="another")).set_index("measure").loc["misaligned_rate"]
    assert "difference_corrected" not in other
