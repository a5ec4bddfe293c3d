"""`emlens eval --config FILE`: the YAML's values, flags laid over them, and one-line errors."""

import json
import re

import pytest
import yaml

from tests.cli_runner import one_line_error, run_cli


def manifest_config(run) -> dict:
    return json.loads((run / "cfg.json").read_text())["config"]


def test_eval_config_file_values_survive_and_flags_override_them(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "settings": ["free_form"], "nudges": ["evil"], "batch_size": 3, "seed": 7,
        "judge": "hf", "judge_model": str(tiny_model_dir),
        "free_form": {"questions": "deception-sit-aware", "samples": 1, "limit": 2, "max_new_tokens": 3}}))

    assert run_cli("eval", "--config", config, "--out", tmp_path / "a", "--model", tiny_model_dir) == 0
    written = manifest_config(tmp_path / "a")
    assert written["settings"] == ["free_form"] and written["nudges"] == ["evil"]
    assert (written["batch_size"], written["seed"]) == (3, 7)
    assert (written["judge"], written["judge_model"]) == ("hf", str(tiny_model_dir))
    assert written["free_form"]["max_new_tokens"] == 3

    assert run_cli("eval", "--config", config, "--out", tmp_path / "b", "--model", tiny_model_dir,
                   "--seed", 9, "--nudge", "none", "--batch-size", 2, "--samples", 2) == 0
    written = manifest_config(tmp_path / "b")
    assert (written["seed"], written["nudges"], written["batch_size"]) == (9, ["none"], 2)
    assert written["free_form"]["samples"] == 2
    # the fields no flag named keep the YAML's values
    assert written["settings"] == ["free_form"] and written["judge"] == "hf"
    assert (written["free_form"]["limit"], written["free_form"]["max_new_tokens"]) == (2, 3)
    capsys.readouterr()


def test_eval_without_config_keeps_the_class_defaults(tiny_model_dir, tmp_path, monkeypatch):
    """No flag and no YAML: the EvalConfig defaults reach run_eval (the CLI restates none of them)."""
    import emlens.evaluation.run as run_module
    from emlens.evaluation.config import EvalConfig

    seen = {}

    def fake_run_eval(handle, config, out, judge=None, **_):
        seen["config"] = config
        import pandas as pd

        return pd.DataFrame({"setting": [], "nudge": []})

    monkeypatch.setattr(run_module, "run_eval", fake_run_eval)
    monkeypatch.setattr("emlens.analysis.report.print_summary", lambda *a, **k: None)
    assert run_cli("eval", "--out", tmp_path / "r", "--model", tiny_model_dir, "--judge", "hf",
                   "--judge-model", tiny_model_dir) == 0
    expected = EvalConfig(judge="hf", judge_model=str(tiny_model_dir))
    assert seen["config"] == expected


BAD_CONFIGS = [
    ("settings: [free_form\n", r"eval\.yaml line \d+: invalid YAML"),
    ("settingz: [free_form]\n", r"eval\.yaml: unknown field 'settingz'"),
    ("free_form:\n  samplez: 3\n", r"eval\.yaml: unknown field 'free_form\.samplez'"),
    ("- free_form\n", r"eval\.yaml: expected a mapping"),
    ("batch_size: 0\n", r"eval\.yaml: field 'batch_size': .*\(got 0\)"),
]


@pytest.mark.parametrize("text, message", BAD_CONFIGS, ids=["syntax", "unknown", "nested-unknown", "list", "value"])
def test_bad_eval_config_is_one_line_and_exit_2(tmp_path, capsys, text, message):
    config = tmp_path / "eval.yaml"
    config.write_text(text)
    err = one_line_error(capsys, run_cli("eval", "--config", config, "--out", tmp_path / "run"))
    assert str(config) in err and re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_a_bad_flag_value_is_one_line_naming_the_field(tiny_model_dir, tmp_path, capsys):
    """A value pydantic refuses reads like every other config error: field, message, the value given."""
    code = run_cli("generate", "--model", tiny_model_dir, "--out", tmp_path / "run", "--max-new-tokens", 0)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "field 'max_new_tokens'" in err and "(got 0)" in err, err
    assert not (tmp_path / "run" / "samples.parquet").exists()
