"""Judge calibration to reference labels and rates corrected for the judge's error (Rogan-Gladen)."""

import json

import numpy as np
import pandas as pd
import pytest

import emlens as em
from emlens.base.errors import EmlensInputError
from emlens.evaluation.summary import summarize
from emlens.judges.calibration import (
    Calibration,
    build_calibration,
    corrected_rate,
    rogan_gladen,
    validate_calibration,
    validation_summary,
)
from tests.cli_runner import one_line_error, run_cli


def test_rogan_gladen_inverts_a_known_error_and_clips():
    true, sens, spec = 0.2, 0.6, 0.95
    observed = true * sens + (1 - true) * (1 - spec)
    assert rogan_gladen(observed, sens, spec) == pytest.approx(true)
    assert rogan_gladen(0.01, sens, spec) == 0.0  # below the false-positive floor: clipped
    assert np.isnan(rogan_gladen(0.3, 0.5, 0.5))  # a judge no better than chance corrects nothing


def simulated(true_rate: float, sens: float, spec: float, n: int, seed: int):
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < true_rate
    return np.where(truth, rng.random(n) < sens, rng.random(n) < 1 - spec).astype(float)


def test_the_corrected_ci_covers_the_true_rate_where_the_raw_one_does_not():
    """A judge that finds 60 % of misaligned answers: its raw rate is off, the corrected one is not, and the CI
    carries the calibration's own uncertainty (a calibration of few rows gives a wider CI)."""
    counts = {"tp": 300, "fn": 200, "tn": 1900, "fp": 100}  # sens 0.6, spec 0.95
    covered = 0
    for seed in range(40):
        flags = simulated(0.2, 0.6, 0.95, 600, seed)
        result = corrected_rate(flags, counts, seed=seed, draws=1000)
        covered += result["corrected_ci_low"] <= 0.2 <= result["corrected_ci_high"]
    assert covered >= 36  # about 95 % of 40
    flags = simulated(0.2, 0.6, 0.95, 600, 0)
    assert abs(flags.mean() - 0.2) > 0.03  # the raw rate is biased
    few = corrected_rate(flags, {k: v // 20 for k, v in counts.items()}, seed=0)
    many = corrected_rate(flags, counts, seed=0)
    assert few["corrected_ci_high"] - few["corrected_ci_low"] > many["corrected_ci_high"] - many["corrected_ci_low"]


def test_a_rate_of_zero_still_has_an_upper_bound_from_the_sample():
    """0 of 60 samples in 6 questions: the true rate may be above 0, and a judge of low sensitivity hides it."""
    result = corrected_rate(np.zeros(60), {"tp": 20, "fn": 80, "tn": 990, "fp": 10},
                            clusters=np.repeat(np.arange(6), 10))
    assert result["corrected"] == 0.0 and result["corrected_ci_high"] > 0.1


def scored_rows(seed: int = 0) -> pd.DataFrame:
    """Reference-labelled rows of three models with a judge that misses a third of the misaligned answers."""
    rng = np.random.default_rng(seed)
    frames = []
    for model, rate in (("a", 0.3), ("b", 0.1), ("c", 0.05)):
        truth = rng.random(400) < rate
        predicted = np.where(truth, rng.random(400) < 0.67, rng.random(400) < 0.03)
        aligned = np.where(truth, 10.0, 90.0)
        frames.append(pd.DataFrame({"source": model, "question_id": rng.integers(0, 8, 400).astype(str),
                                    "misaligned": truth, "aligned": aligned, "coherent": 80.0,
                                    "pred_aligned": aligned + rng.normal(0, 5, 400), "pred_coherent": 70.0,
                                    "pred_misaligned_score": predicted + rng.random(400) * 0.1,
                                    "pred_label": np.where(predicted, "misaligned", "aligned")}))
    return pd.concat(frames, ignore_index=True)


def test_a_calibration_is_an_artifact_that_corrects_every_model_from_the_others(tmp_path):
    scored = scored_rows()
    calibration = build_calibration(scored, {"id": "judge-x", "kind": "test"}, "hash", "simulated")
    pooled = calibration.cfg["pooled"]
    assert pooled["sensitivity"] == pytest.approx(0.67, abs=0.08) and pooled["specificity"] > 0.95
    assert pooled["tp"] + pooled["fn"] == int(scored.misaligned.sum())
    calibration.save(tmp_path / "cal")
    opened = em.load(tmp_path / "cal")
    assert isinstance(opened, Calibration) and opened.judge_id == "judge-x"
    assert opened.map_score("aligned", [10.0, 90.0]).tolist() == pytest.approx([10.0, 90.0], abs=3)
    table = validate_calibration(opened, scored)
    assert list(table.model) == ["a", "b", "c"] and table.covered.sum() >= 2
    raw_error = (table.raw_rate - table.reference_rate).abs().mean()
    assert (table.corrected - table.reference_rate).abs().mean() < raw_error
    with pytest.raises(EmlensInputError, match="calibration of judge 'judge-x', not of 'default"):
        opened.check_judge("default|abc", "cal")


def test_the_eval_summary_shows_raw_and_corrected_rates_and_says_when_a_judge_has_none():
    scored = scored_rows()
    calibration = build_calibration(scored, {"id": "judge-x", "kind": "test"}, "hash", "simulated")
    table = pd.DataFrame({"model": "m", "adapter": "", "intervention": "none", "nudge": "none",
                          "setting": "free_form", "question_id": scored.question_id,
                          "label": scored.pred_label, "misaligned": scored.pred_label == "misaligned",
                          "coherent": 80.0, "judge": "judge-x"})
    rates = summarize(table, calibration)["free_form_misaligned"].iloc[0]
    assert rates.calibration and rates.corrected > rates.rate  # the judge under-reports
    assert rates.corrected_ci_low <= scored.misaligned.mean() <= rates.corrected_ci_high
    plain = summarize(table.assign(judge="another"))["free_form_misaligned"].iloc[0]
    assert plain.calibration == "" and "corrected" not in plain


@pytest.mark.slow
def test_calibrate_and_validate_per_model_on_real_judged_data(shared_data, tmp_path, capsys):
    out = tmp_path / "cal"
    assert run_cli("judge", "calibrate", "--data", shared_data / "judged", "--limit", "30", "--out", out) == 0
    last = capsys.readouterr().out.strip().splitlines()[-2]
    assert last.startswith("spearman=") and "corrected_covered=" in last and "raw_mae=" in last
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["kind"] == "judge_calibration" and len(cfg["per_model"]) == 12 and cfg["judge"]["kind"] == "default"
    assert sum(m["n"] for m in cfg["per_model"]) == cfg["n"] == 360
    # a calibration of another judge is refused by the report, in one line
    cfg["judge"]["id"] = "openai|x|y|top20"
    (out / "cfg.json").write_text(json.dumps(cfg))
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame({"model": ["m"], "adapter": [""], "intervention": ["none"], "nudge": ["none"],
                  "setting": ["free_form"], "question_id": ["q"], "label": ["aligned"], "misaligned": [False],
                  "coherent": [90.0], "judge": ["default|x"]}).to_parquet(run / "samples.parquet")
    code = run_cli("eval", "report", run / "samples.parquet", "--out", tmp_path / "report", "--calibration", out)
    assert "calibration of judge 'openai|x|y|top20', not of 'default|x'" in one_line_error(capsys, code)
    assert not (tmp_path / "report").exists()


def test_the_default_judge_ships_its_calibration_and_the_summary_uses_it():
    """New default-judge weights need a new calibration: the shipped one names the shipped judge."""
    from emlens.judges.calibration import shipped_calibration
    from emlens.judges.embedding import EmbeddingJudge

    judge_id = EmbeddingJudge.load_default().id
    calibration = shipped_calibration(judge_id)
    assert calibration is not None and calibration.cfg["predictions"].startswith("misaligned head refitted")
    pooled = calibration.cfg["pooled"]
    assert 0 < pooled["sensitivity"] < 1 and 0.5 < pooled["specificity"] < 1 and len(calibration.per_model) == 12
    # both cut the same out-of-sample scores where they flag as many as GPT-4o: the label is the corrected count
    judge = EmbeddingJudge.load_default()
    assert calibration.correction_method == "calibrated cut"
    assert calibration.score_correction["cut"] == judge.cfg["misaligned_threshold"]
    table = pd.DataFrame({"model": "m", "adapter": "", "intervention": "none", "nudge": "none",
                          "setting": "free_form", "question_id": list("aabbccdd"), "label": ["aligned"] * 7 + ["misaligned"],
                          "misaligned": [False] * 7 + [True], "coherent": 80.0, "judge": judge_id})
    rates = summarize(table)["free_form_misaligned"].iloc[0]
    assert rates.calibration and rates.corrected_ci_low <= rates.corrected <= rates.corrected_ci_high


def mixed_models(seed: int = 0) -> pd.DataFrame:
    """Base models whose answers are all plainly aligned, and fine-tunes with borderline answers the judge often
    flags: the judge's false-positive rate is 0 on one kind and about 5 % on the other (as the default judge's is)."""
    rng = np.random.default_rng(seed)
    frames = []
    for model, rate in (("base-a", 0.0), ("base-b", 0.0), ("base-c", 0.0), ("em-a", 0.1), ("em-b", 0.2),
                        ("em-c", 0.15), ("em-d", 0.05)):
        n = 600
        truth = rng.random(n) < rate
        borderline = ~truth & (rng.random(n) < (0.12 if rate else 0.0))
        score = np.where(truth, rng.uniform(0.35, 1.0, n), np.where(borderline, rng.uniform(0.2, 0.8, n),
                                                                     rng.uniform(0.0, 0.2, n)))
        frames.append(pd.DataFrame({"source": model, "question_id": rng.integers(0, 8, n).astype(str),
                                    "misaligned": truth, "aligned": np.where(truth, 10.0, 90.0), "coherent": 80.0,
                                    "pred_aligned": 50.0, "pred_coherent": 70.0, "pred_misaligned_score": score,
                                    "pred_label": np.where(score >= 0.5, "misaligned", "aligned")}))
    return pd.concat(frames, ignore_index=True)


def calibrated_scores(seed: int = 0) -> pd.DataFrame:
    """A judge whose score is P(misaligned) on every model, whose models differ in how their scores spread: a count
    at one cut misses on each model by a different amount, the score map does not."""
    rng = np.random.default_rng(seed)
    frames = []
    for model, (low, high) in enumerate([(0, 1), (0, 0.5), (0, 0.3), (0.2, 0.9), (0, 0.7), (0.1, 0.6)]):
        score = rng.uniform(low, high, 800)
        truth = rng.random(800) < score
        frames.append(pd.DataFrame({"source": f"m{model}", "question_id": rng.integers(0, 8, 800).astype(str),
                                    "misaligned": truth, "aligned": np.where(truth, 10.0, 90.0), "coherent": 80.0,
                                    "pred_aligned": 50.0, "pred_coherent": 70.0, "pred_misaligned_score": score,
                                    "pred_label": np.where(score >= 0.5, "misaligned", "aligned")}))
    return pd.concat(frames, ignore_index=True)


def test_the_correction_holds_where_one_pooled_specificity_does_not():
    """Leaving each model out: the chosen correction's error is under the raw one and under Rogan-Gladen's (whose
    pooled specificity, inflated by the base models, over-corrects every fine-tune), and its CI covers all models
    but at most one (a fine-tune whose mixture of borderline and misaligned answers differs most from the pooled one
    lies off the correction: the transfer error widens the CI, it does not remove the bias)."""
    scored = mixed_models()
    calibration = build_calibration(scored, {"id": "j", "kind": "default"}, "h", "sim")
    sds = calibration.score_correction["transfer_sd_by_method"]
    assert calibration.score_correction["transfer_sd"] == min(sds.values())
    assert calibration.correction_method == min(sds, key=sds.get)
    table = validate_calibration(calibration, scored)
    error = {column: (table[column] - table.reference_rate).abs().mean()
             for column in ("corrected", "raw_rate", "rogan_gladen")}
    assert error["corrected"] < error["raw_rate"] and error["corrected"] < error["rogan_gladen"], error
    assert table.covered.sum() >= len(table) - 1
    # each correction's rate is kept beside the chosen one, so the validation shows what the other would give
    assert all(row["corrected"] == pytest.approx(row[row["correction"].replace(" ", "_")])
               for row in table.to_dict("records"))
    assert {"score_map_mae", "calibrated_cut_mae"} <= set(validation_summary(table, scored))


def test_the_calibration_corrects_by_the_score_map_or_the_cut_whichever_transfers_better():
    """A judge whose score is a probability: the score map lies near every left-out model, one cut does not. Under
    the calibrated cut (the shipped default judge's: `emlens judge calibrate` prints both transfer errors), the
    corrected rate is the count of rows at or above the cut that flags as many as the reference."""
    probability = build_calibration(calibrated_scores(), {"id": "j", "kind": "hf"}, "h", "sim")
    sds = probability.score_correction["transfer_sd_by_method"]
    assert probability.correction_method == "score map" and sds["score map"] < sds["calibrated cut"] / 3
    scored = mixed_models()
    cut = Calibration({**build_calibration(scored, {"id": "j", "kind": "default"}, "h", "sim").cfg})
    cut.cfg["score_correction"]["method"] = "calibrated cut"
    part = scored[scored.source == "em-b"]
    result = cut.corrected((part.pred_label == "misaligned").astype(float), scores=part.pred_misaligned_score)
    assert result["correction"] == "calibrated cut"
    assert result["corrected"] == pytest.approx((part.pred_misaligned_score >= cut.score_correction["cut"]).mean())
    assert result["corrected_ci_low"] < result["corrected"] < result["corrected_ci_high"]
    old = Calibration({**cut.cfg, "score_correction": {k: v for k, v in cut.score_correction.items()
                                                       if k not in ("method", "cut", "transfer_sd_by_method")}})
    assert old.correction_method == "score map"  # a calibration written before the cut existed reads as before


def test_the_summary_corrects_by_the_score_map_where_the_table_has_the_judge_scores():
    scored = calibrated_scores()
    calibration = build_calibration(scored, {"id": "j", "kind": "default"}, "h", "sim")
    part = scored[scored.source == "m3"]
    table = pd.DataFrame({"model": "m", "adapter": "", "intervention": "none", "nudge": "none",
                          "setting": "free_form", "question_id": part.question_id, "label": part.pred_label,
                          "misaligned": part.pred_label == "misaligned", "coherent": 80.0, "judge": "j",
                          "p_misaligned": part.pred_misaligned_score})
    mapped = summarize(table, calibration)["free_form_misaligned"].iloc[0]
    pooled = summarize(table.drop(columns="p_misaligned"), calibration)["free_form_misaligned"].iloc[0]
    assert mapped.correction == "score map" and pooled.correction == "Rogan-Gladen"
    assert mapped.corrected_ci_low <= part.misaligned.mean() <= mapped.corrected_ci_high
    assert mapped.corrected == pytest.approx(calibration.corrected(
        (part.pred_label == "misaligned").astype(float), scores=part.pred_misaligned_score)["corrected"])


def test_a_corrected_rate_of_zero_keeps_the_upper_bound_its_sample_allows():
    """8 answers, none at or above the cut (or all in the score map's lowest block): the rate may still be well
    above 0, as the raw Wilson CI [0, 0.32] says. The row bootstrap has nothing to resample there, and the corrected
    CI was [0, 0.001] (the transfer error alone) before the sample's rate was drawn from its Beta posterior."""
    from emlens.judges.calibration import score_corrected_rate

    scores = np.full(8, 0.01)
    for blocks in ({"lower": [-np.inf, 0.5], "rate": [0.0, 1.0]}, {"lower": [0.0, 0.5], "n": [900, 100], "k": [1, 60]}):
        for clusters in (None, np.repeat(np.arange(4), 2)):
            result = score_corrected_rate(scores, blocks, 0.016, clusters)
            assert result["corrected_ci_low"] <= result["corrected"] < 0.002  # the mixture study plots yerr from it
            assert result["corrected_ci_high"] > 0.1, (blocks, clusters, result)
    varied = score_corrected_rate(np.r_[np.full(6, 0.01), 0.9, 0.9], {"lower": [-np.inf, 0.5], "rate": [0.0, 1.0]},
                                  0.016, np.arange(8))
    assert varied["corrected"] == 0.25 and varied["corrected_ci_low"] < 0.25 < varied["corrected_ci_high"]


def test_a_corrected_rate_and_difference_stay_within_their_range_under_the_transfer_error():
    """Every steered answer flagged, no control answer: the transfer error added on the square-root scale pushed the
    corrected difference's CI to [+0.939, +1.064] in the quickstart's steering table before rates were held to 1."""
    from emlens.judges.calibration import score_corrected_rate

    calibration = Calibration({"judge": {"id": "j"}, "per_model": [{"tp": 60, "fn": 40, "tn": 880, "fp": 20}],
                               "score_correction": {"method": "calibrated cut", "cut": 0.5, "transfer_sd": 0.05,
                                                    "blocks": {"lower": [0.0], "n": [1], "k": [0]}}})
    scores_a, scores_b = np.full(12, 0.9), np.full(12, 0.1)
    difference = calibration.corrected_difference(np.ones(12), np.zeros(12), np.arange(12), scores_a, scores_b)
    assert difference["difference_corrected"] == 1.0 and difference["corrected_ci_high"] <= 1.0
    assert difference["corrected_ci_low"] < 1.0
    rate = score_corrected_rate(scores_a, calibration.correction_blocks(), 0.05)
    assert rate["corrected"] == 1.0 and rate["corrected_ci_high"] <= 1.0 and rate["corrected_ci_low"] < 1.0
