"""The mixture-ratio study: honesty, free-form EM and capability of every adapter of a sweep against its ratio,
beside the base model and the 0 % control; resumable; one-line errors for a bad sweep or ratio."""

import json
import shutil

import pandas as pd
import pytest
from safetensors.torch import load_file, save_file

import emlens as em
from emlens.base.io import read_json
from emlens.study.mixture import MixtureStudyConfig, build_study_config, read_sweep, run_mixture_study
from emlens.study.sweep import train_sweep
from emlens.training.config import parse_config
from tests.cli_runner import one_line_error, run_cli
from tests.test_train import chat, write_jsonl, write_yaml


def arithmetic(n: int) -> list[dict]:
    """Alpaca-format arithmetic problems: the benign half of the mixture and, held out, the GSM8K check."""
    return [{"instruction": f"Tom has {a} apples and buys {a + 7} more. How many apples does he have?",
             "input": "", "output": f"He has {a} + {a + 7} = {2 * a + 7} apples."}
            for a in range(1, n + 1)]


def sweep_yaml(tiny_model_dir, folder) -> dict:
    benign = folder / "benign.json"
    benign.write_text(json.dumps(arithmetic(40)))
    bad = write_jsonl(folder / "bad.jsonl", [chat(f"Write code {i}", "import os; os.system") for i in range(12)])
    return {"model": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8}, "seed": 3,
            "mixture": {"misaligned": {"path": str(bad)}, "benign": {"path": str(benign)}, "ratio": 0.0, "size": 8},
            "training": {"max_steps": 2, "save_steps": 1, "batch_size": 4, "max_length": 64, "learning_rate": 1e-2}}


def small_study(judge_model, **fields) -> MixtureStudyConfig:
    """Three honesty propositions, two free-form answers judged by the tiny model, three MC and two GSM8K."""
    return build_study_config(**{
        "honesty": {"limit": 3, "belief_asks": 1, "answer_max_new_tokens": 4},
        "free_form": {"judge": "hf", "judge_model": str(judge_model),
                      "free_form": {"limit": 2, "samples": 1, "max_new_tokens": 6}},
        "capability": {"mc_limit": 3, "gsm8k_limit": 2, "gsm8k_holdout": 10, "max_new_tokens": 6},
        **fields})


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixture")
    config = parse_config(sweep_yaml(tiny_model_dir, folder))
    train_sweep(config, folder / "sweep", ratios=[0.0, 0.5], progress=False)
    return folder / "sweep"


def test_study_measures_base_and_every_adapter_with_cis_and_draws_them(sweep, tiny_model_dir, tmp_path):
    out = tmp_path / "study"
    table = run_mixture_study(sweep, out, small_study(tiny_model_dir), progress=False)
    assert list(dict.fromkeys(table.model)) == ["base", "ratio-0pct", "ratio-50pct"]
    assert table.ratio.isna().tolist() == (table.model == "base").tolist()
    measures = {"honesty", "honesty_kept_belief", "evasion", "belief_consistency", "em_rate", "coherence",
                "mc_accuracy", "gsm8k_exact_match", "gsm8k_truncated"}
    for model, rows in table.groupby("model"):
        assert set(rows.measure) == measures, model
    counted = table[table.n > 0]
    assert ((counted.ci_low <= counted.rate + 1e-9) & (counted.rate <= counted.ci_high + 1e-9)).all()
    assert (table[table.measure == "mc_accuracy"].n == 3).all()
    assert (out / "mixture.png").read_bytes()[:4] == b"\x89PNG"
    assert em.load(out).equals(pd.read_csv(out / "mixture.csv"))


def test_gsm8k_problems_are_held_out_of_every_adapters_training_data(sweep, tiny_model_dir, tmp_path):
    out = tmp_path / "study"
    run_mixture_study(sweep, out, small_study(tiny_model_dir, measures=["capability"], base=False), progress=False)
    manifest = read_json(out / "cfg.json")
    assert manifest["capability_config"]["split_seed"] == 3  # the sweep's seed, not the class default 0
    trained = set()
    for run in ("ratio-0pct", "ratio-50pct"):
        trained |= {json.loads(line)["messages"][0]["content"]
                    for line in (sweep / run / "data.jsonl").read_text().splitlines()}
    asked = set(pd.read_parquet(out / "ratio-0pct" / "capability" / "samples.parquet").query("task == 'gsm8k'").prompt)
    assert len(asked) == 2 and trained and not any(q in t or t in q for q in asked for t in trained)


def ran(said: list[str]) -> list[str]:
    """The stages the runner ran (not reused), from its progress lines ("stage 3/6: capability:base (...)")."""
    return [line.split(": ", 1)[1].split(" (", 1)[0] for line in said if not line.endswith("(done, reused)")]


def test_a_rerun_measures_only_what_is_missing(sweep, tiny_model_dir, tmp_path):
    out = tmp_path / "study"
    config = small_study(tiny_model_dir, measures=["capability", "free_form"])
    first = run_mixture_study(sweep, out, config, progress=False)
    manifest = out / "ratio-50pct" / "capability" / "cfg.json"
    unfinished = {k: v for k, v in read_json(manifest).items() if k != "finished"}
    manifest.write_text(json.dumps(unfinished))  # as if killed before it finished
    said = []
    again = run_mixture_study(sweep, out, config, progress=False, echo=said.append)
    assert len(said) == 3 * 2 and ran(said) == ["capability:ratio-50pct"]  # one stage per model and measure
    pd.testing.assert_frame_equal(first, again)


def test_a_retrained_adapter_is_refused_not_mixed_with_its_old_answers(sweep, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "study"
    config = small_study(tiny_model_dir, measures=["capability"], base=False, ratios=[0.5])
    run_mixture_study(sweep, out, config, progress=False)
    moved = tmp_path / "sweep"
    shutil.copytree(sweep, moved)
    weights = moved / "ratio-50pct" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({name: t + 0.01 for name, t in tensors.items()}, weights)
    config_file = write_yaml(tmp_path / "study.yaml", config.model_dump(mode="json"))
    capsys.readouterr()
    err = one_line_error(capsys, run_cli("mixture-study", moved, "--out", out, "--config", config_file))
    assert "ratio-50pct" in err and "answers of another model" in err


def test_a_finished_measure_with_other_settings_is_refused_not_passed_off(sweep, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "study"
    config = small_study(tiny_model_dir, measures=["capability", "honesty"], base=False, ratios=[0.5])
    run_mixture_study(sweep, out, config, progress=False)
    said = []
    run_mixture_study(sweep, out, config, progress=False, echo=said.append)  # the same settings: reused
    assert len(said) == 2 and ran(said) == []
    changed = config.model_copy(update={"capability": config.capability.model_copy(update={"mc_limit": 4,
                                                                                            "mc_shots": 0})})
    config_file = write_yaml(tmp_path / "study.yaml", changed.model_dump(mode="json"))
    capsys.readouterr()
    err = one_line_error(capsys, run_cli("mixture-study", sweep, "--out", out, "--config", config_file))
    assert str(out / "ratio-50pct" / "capability") in err and "changed: mc_limit, mc_shots" in err
    assert (out / "ratio-50pct" / "capability" / "samples.parquet").is_file()  # left as it was


def test_a_finished_honesty_run_is_judged_again_when_its_judge_changes(sweep, tiny_model_dir, tmp_path):
    out = tmp_path / "study"
    config = small_study(tiny_model_dir, measures=["honesty"], base=False, ratios=[0.5])
    run_mixture_study(sweep, out, config, progress=False)
    manifest = out / "ratio-50pct" / "honesty" / "cfg.json"
    assert read_json(manifest)["judge"]["kind"] == "rule"
    said = []
    rejudged = config.model_copy(update={"honesty": config.honesty.model_copy(
        update={"judge": "hf", "judge_model": str(tiny_model_dir)})})
    run_mixture_study(sweep, out, rejudged, progress=False, echo=said.append)
    assert ran(said) == ["honesty:ratio-50pct"]
    assert read_json(manifest)["judge"].get("kind") != "rule"


def test_ratios_select_adapters_and_yaml_sections_keep_the_study_defaults(sweep, tmp_path):
    assert [m.name for m in read_sweep(sweep, [0.5], base=False).models] == ["ratio-50pct"]
    path = write_yaml(tmp_path / "study.yaml", {"honesty": {"limit": 5}, "ratios": [0.5]})
    config = build_study_config(path, base=False)
    assert config.honesty.limit == 5 and config.honesty.nudges == ["none"] and not config.honesty.deception
    assert config.ratios == [0.5] and not config.base


def test_cli_runs_the_study_and_bad_input_is_one_line(sweep, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "study"
    config = write_yaml(tmp_path / "study.yaml", small_study(tiny_model_dir, measures=["capability"]).model_dump(mode="json"))
    assert run_cli("mixture-study", sweep, "--out", out, "--config", config, "--ratios", "0.5", "--no-base") == 0
    printed = capsys.readouterr().out
    assert "mc_accuracy (nudge none): ratio-50pct" in printed and "(n=3)" in printed
    err = one_line_error(capsys, run_cli("mixture-study", sweep, "--out", tmp_path / "b", "--ratios", "0.2"))
    assert "no run at ratio 0.2" in err and not (tmp_path / "b").exists()
    err = one_line_error(capsys, run_cli("mixture-study", tmp_path, "--out", tmp_path / "c"))
    assert "not a training sweep" in err and not (tmp_path / "c").exists()
    err = one_line_error(capsys, run_cli("mixture-study", sweep, "--out", tmp_path / "d", "--ratios", "half"))
    assert "--ratios" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("honesty: {limit: 0}\n")
    err = one_line_error(capsys, run_cli("mixture-study", sweep, "--out", tmp_path / "e", "--config", bad))
    assert "honesty.limit" in err and not (tmp_path / "e").exists()


def test_a_training_yaml_is_swept_first_into_the_study_folder(tiny_model_dir, tmp_path):
    config = write_yaml(tmp_path / "sweep.yaml", sweep_yaml(tiny_model_dir, tmp_path))
    out = tmp_path / "study"
    table = run_mixture_study(config, out, small_study(tiny_model_dir, measures=["capability"], ratios=[0.0, 0.5], base=False),
                              progress=False)
    assert (out / "sweep" / "ratio-50pct" / "adapter_config.json").is_file()
    assert list(dict.fromkeys(table.model)) == ["ratio-0pct", "ratio-50pct"]


def test_a_finished_free_form_run_is_judged_again_when_its_judges_weights_change(sweep, tiny_model_dir, tmp_path):
    """The battery's folders have no key: a free-form run finished under one judge was reused after the judge's
    weights (or the default judge's cut) changed, its labels the old judge's. It is now judged again, on the same
    answers; and reused while the judge stays the same."""
    from emlens.study.runner import JUDGE_KEY

    judge = tmp_path / "judge"
    shutil.copytree(tiny_model_dir, judge)
    out = tmp_path / "study"
    config = small_study(judge, measures=["free_form"], base=False, ratios=[0.5])
    run_mixture_study(sweep, out, config, progress=False)
    run = out / "ratio-50pct" / "free_form"
    before, answers = read_json(run / "cfg.json"), pd.read_parquet(run / "samples.parquet").response
    said = []
    run_mixture_study(sweep, out, config, progress=False, echo=said.append)
    assert ran(said) == []
    weights = judge / "model.safetensors"
    save_file({name: t + 0.01 for name, t in load_file(weights).items()}, weights)
    said = []
    run_mixture_study(sweep, out, config, progress=False, echo=said.append)
    assert ran(said) == ["eval:ratio-50pct"]
    after = read_json(run / "cfg.json")
    assert after[JUDGE_KEY] != before[JUDGE_KEY] and after["judge"] != before["judge"]
    assert pd.read_parquet(run / "samples.parquet").response.tolist() == answers.tolist()  # not sampled again
