"""The measure registry: a measure written in one file (this one) becomes an experiment section, a stage per model,
a report section and a line of `emlens measures`, without touching any other module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

from emlens.base.stats import rate
from emlens.evaluation.measures import MEASURES, Measure, register_measure, unregister_measure
from tests.cli_runner import one_line_error, run_cli


class LongPromptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[str] = Field(min_length=1)
    longer_than: int = 3  # tokens


def run_long_prompts(model, config: LongPromptConfig, out: Path, *, judge=None, interventions=(), progress=True):
    """The share of prompts longer than `longer_than` tokens under the model's own tokenizer."""
    lengths = [len(model.tokenizer(p)["input_ids"]) for p in config.prompts]
    out.mkdir(parents=True, exist_ok=True)
    summary = rate([float(n > config.longer_than) for n in lengths])
    (out / "cfg.json").write_text(json.dumps({"kind": "long_prompt_run", "finished": True, "summary": summary,
                                              "lengths": lengths}))


def long_prompt_rates(out: Path) -> list[dict]:
    summary = json.loads((out / "cfg.json").read_text())["summary"]
    return [{"measure": "long_prompt_share", "nudge": "none", **{k: summary[k] for k in ("rate", "n", "ci_low",
                                                                                         "ci_high")}}]


@pytest.fixture
def long_prompts():
    measure = register_measure(Measure(name="long_prompts", config=LongPromptConfig, run=run_long_prompts,
                                       rates=long_prompt_rates, title="Long prompts",
                                       description="long_prompt_share: prompts longer than the threshold",
                                       prepare=lambda config: f"{len(config.prompts)} prompts"))
    yield measure
    unregister_measure("long_prompts")


def test_a_measure_registered_in_one_file_gets_a_stage_a_report_section_and_a_cli_listing(
        long_prompts, tiny_model_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="registered already"):
        register_measure(long_prompts)
    assert run_cli("measures") == 0
    listing = capsys.readouterr().out
    assert "long_prompts" in listing and "LongPromptConfig" in listing and "honesty" in listing

    prompts = ["hi", "What is the capital of France, and why is it there?", "Tell me a long story about a cat."]
    spec = {"name": "tiny-long", "models": [{"name": "base", "model": str(tiny_model_dir)}],
            "long_prompts": {"prompts": prompts, "longer_than": 3}}
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(spec))
    stages = tmp_path / "stages"
    assert run_cli("run", path, "--plan", "--stages", stages) == 0
    plan = capsys.readouterr().out
    assert "long_prompts:base" in plan and "3 prompts" in plan
    assert run_cli("run", path, "--out", tmp_path / "report", "--stages", stages) == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    section = markdown.split("## Long prompts")[1].split("\n## ")[0]
    assert "long_prompt_share: prompts longer than the threshold" in section
    assert "| base" in section and "n=3" in section and "long_prompts.png" in section
    run = next(stages.glob("long_prompts-base-*"))
    assert json.loads((run / "cfg.json").read_text())["lengths"][0] <= 3  # "hi" is short under any tokenizer

    spec["long_prompts"] = {"prompts": prompts, "longer_than": "many"}
    path.write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    assert "'long_prompts.longer_than'" in one_line_error(capsys, run_cli("run", path, "--plan", "--stages", stages))


def test_an_unregistered_section_is_still_one_line(tiny_model_dir, tmp_path, capsys):
    assert "long_prompts" not in MEASURES
    spec = {"name": "tiny-long", "models": [{"name": "base", "model": str(tiny_model_dir)}],
            "long_prompts": {"prompts": ["hi"]}}
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert "long_prompts" in one_line_error(capsys, run_cli("run", path, "--plan", "--stages", tmp_path / "s"))
