"""`emlens monitor`, `emlens ablate-weights` and `emlens steer` spec errors, through the CLI."""

import re

import pandas as pd
import pytest

from tests.cli_runner import one_line_error, run_cli
from tests.test_dose_response import make_direction

NUMBER = r"(-?\d+\.\d{3}|nan)"


# ---------------------------------------------------------------- monitor


def test_monitor_with_default_options_prints_r_ci_and_random_control(tiny, tiny_judge, tmp_path, capsys):
    from emlens.base.io import atomic_write_table
    from emlens.evaluation.config import build_eval_config
    from emlens.evaluation.run import run_eval

    config = build_eval_config(None, settings="free_form", nudges=["none", "evil"], samples=3, limit=2,
                               max_new_tokens=6, batch_size=6)
    run = tmp_path / "run"
    table = run_eval(tiny, config, run, judge=tiny_judge, progress=False)
    # the random tiny model is never judged misaligned: plant a target that varies, so r is a number
    table = table.assign(misaligned=[i % 2 == 0 for i in range(len(table))])
    atomic_write_table(table, run / "samples.parquet")
    make_direction(tiny, tmp_path / "dir")

    assert run_cli("monitor", run, "--direction", tmp_path / "dir", "--model", tiny.spec) == 0
    out = capsys.readouterr().out
    found = re.search(rf"\(mean_response\) vs misaligned: r={NUMBER} \[{NUMBER}, {NUMBER}\] n=(\d+); "
                      rf"random direction r={NUMBER} \[{NUMBER}, {NUMBER}\]", out)
    assert found, out
    r, low, high, n, random_r, random_low, random_high = found.groups()
    assert int(n) == (table.response.astype(str) != "").sum() >= 4
    assert float(low) <= float(r) <= float(high)
    assert float(random_low) <= float(random_r) <= float(random_high)
    assert "nan" not in (r, random_r)


def test_monitor_unknown_position_is_one_line(tiny, tmp_path, capsys):
    make_direction(tiny, tmp_path / "dir")
    pd.DataFrame({"setting": ["free_form"], "misaligned": [True], "response": ["x"],
                  "messages": ['[{"role": "user", "content": "hi"}]']}).to_parquet(tmp_path / "t.parquet")
    code = run_cli("monitor", tmp_path / "t.parquet", "--direction", tmp_path / "dir", "--model", tiny.spec,
                   "--position", "all")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "position 'all'" in err, err


# ---------------------------------------------------------------- ablate-weights


@pytest.fixture
def lora_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["o_proj", "down_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_ablate_weights_never_deletes_a_user_folder_unless_forced(tiny, lora_adapter, tmp_path, capsys):
    make_direction(tiny, tmp_path / "dir")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    args = ("ablate-weights", lora_adapter, "--direction", tmp_path / "dir", "--out", out)

    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--force" in err, err
    assert (out / "notes.txt").read_text() == "my notes"
    assert not (out / "adapter_model.safetensors").exists()

    assert run_cli(*args, "--force") == 0
    assert not (out / "notes.txt").exists() and (out / "adapter_model.safetensors").is_file()
    first = (out / "adapter_model.safetensors").stat().st_mtime_ns

    assert run_cli(*args) == 0  # its own earlier output is replaced without --force
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns >= first
    assert "wrote" in capsys.readouterr().out


# ---------------------------------------------------------------- steering spec errors


BAD_SPECS = [
    ("name: x\ndirection: [d\n", r"spec\.yaml line \d+: invalid YAML"),
    ("name: x\ndirection: d\nscalez: [1]\n", r"spec\.yaml: unknown field 'scalez'"),
    ("name: x\ndirection: d\neval:\n  free_form:\n    samplez: 3\n", r"spec\.yaml: unknown field 'eval\.free_form\.samplez'"),
    ("- name\n- direction\n", r"spec\.yaml: expected a mapping"),
    ("name: x\ndirection: d\nscales: [big]\n", r"spec\.yaml: field 'scales\.0'"),
]


@pytest.mark.parametrize("text, message", BAD_SPECS, ids=["syntax", "unknown", "nested-unknown", "list", "value"])
def test_bad_steering_spec_is_one_line_and_exit_2(tmp_path, capsys, text, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    err = one_line_error(capsys, run_cli("steer", spec, "--out", tmp_path / "o"))
    assert str(spec) in err and re.search(message, err), err
    assert not (tmp_path / "o").exists()
