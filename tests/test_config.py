"""The one config base (`emlens.base.config.Config`): YAML with flags over it, paths read beside their file,
an identity without the fields that change no result, and a command line whose `--help` shows the real defaults."""

import os

import pytest
import typer
import yaml

from emlens.base.config import Config
from emlens.base.errors import EmlensInputError
from emlens.capture.config import ExtractConfig
from emlens.cli import app
from emlens.evaluation.capability_tasks import CapabilityConfig
from emlens.evaluation.config import LIMITED_SETTINGS, EvalConfig
from emlens.evaluation.honesty import HonestyConfig
from emlens.sae.train import SAETrainConfig
from emlens.study.experiment import Experiment, LoadedExperiment
from emlens.study.loop_config import LoopConfig
from emlens.study.steer import SteerSpec
from emlens.training.config import TrainConfig

CONFIGS = (EvalConfig, HonestyConfig, CapabilityConfig, LoopConfig, TrainConfig, SteerSpec, ExtractConfig,
           SAETrainConfig, Experiment)


def write_yaml(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_config_class_is_a_config():
    assert all(issubclass(cls, Config) for cls in CONFIGS)


def test_a_question_file_beside_the_yaml_is_read_from_there_whatever_the_working_folder(tmp_path, monkeypatch):
    folder = tmp_path / "study"
    (folder / "qs.yaml").parent.mkdir(parents=True)
    (folder / "qs.yaml").write_text("- id: q\n  paraphrases: [hello]\n")
    path = write_yaml(folder / "eval.yaml", {"free_form": {"questions": "qs.yaml"},
                                             "refusal": {"harmful": ["qs.yaml", "strongreject"]}})
    monkeypatch.chdir(tmp_path)  # not the YAML's folder
    config = EvalConfig.from_yaml(path)
    assert config.free_form.questions == str(folder / "qs.yaml")
    assert config.refusal.harmful == [str(folder / "qs.yaml"), "strongreject"]  # a bundled name stays a name
    assert config.factual.questions == "mmlu-pro-200"


def test_an_experiments_eval_file_is_read_beside_the_experiment(tmp_path, monkeypatch):
    folder = tmp_path / "experiments"
    folder.mkdir()
    (folder / "qs.yaml").write_text("- id: q\n  paraphrases: [hello]\n")
    path = write_yaml(folder / "x.yaml", {"name": "x", "models": [{"name": "base"}],
                                          "eval": {"settings": ["free_form"], "free_form": {"questions": "qs.yaml"}},
                                          "honesty": {"limit": 2}})
    monkeypatch.chdir(tmp_path)
    study = LoadedExperiment(path)
    assert study.spec.eval.free_form.questions == str(folder / "qs.yaml")
    assert study.spec.honesty.propositions == "emlens-honesty"


def test_flags_override_the_yaml_and_one_flag_sets_several_fields(tmp_path):
    path = write_yaml(tmp_path / "eval.yaml", {"free_form": {"samples": 7}, "seed": 3})
    config = EvalConfig.from_yaml(path, samples=2, limit=5, settings="free_form,refusal", nudges=[], seed=None)
    assert config.free_form.samples == 2 and config.seed == 3  # a flag that is None or empty was not given
    assert all(getattr(config, section).limit == 5 for section in LIMITED_SETTINGS)
    assert config.settings == ["free_form", "refusal"] and config.nudges == ["none", "evil", "hhh"]
    assert EvalConfig.from_yaml(path).free_form.samples == 7


def test_a_bad_flag_or_field_is_one_line_naming_it(tmp_path):
    with pytest.raises(EmlensInputError, match=r"field 'free_form.samples'"):
        EvalConfig.from_yaml(None, samples=0)
    path = write_yaml(tmp_path / "eval.yaml", {"free_form": {"sampels": 2}})
    with pytest.raises(EmlensInputError, match=r"eval.yaml: unknown field 'free_form.sampels'"):
        EvalConfig.from_yaml(path)


def test_identity_leaves_out_what_changes_no_result():
    a, b = EvalConfig(), EvalConfig(judge_concurrency=64)
    assert a.identity() == b.identity() and "judge_concurrency" not in a.identity()
    assert a.identity() != EvalConfig(seed=1).identity()
    loop = LoopConfig().identity()
    assert "concurrency" not in loop["user"] and "timeout" not in loop["user"] and "model" in loop["user"]
    assert "judge_concurrency" not in HonestyConfig().identity()


def test_the_steer_section_of_an_experiment_is_the_steering_spec():
    shared = set(SteerSpec.model_fields) - {"name", "model", "adapter", "direction", "latent"}
    from emlens.study.experiment import SteerSection

    assert shared <= set(SteerSection.model_fields)
    section = SteerSection(model="base", direction="refusal", site="resid_pre", scale_unit="absolute")
    assert section.scales == [0.0, 1.0, 2.0] and section.eval.settings == ["refusal"]


def _config_options(command):
    for param in command.params:
        if getattr(param, "opts", None) and isinstance(param.show_default, str):
            yield param


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))
        yield (*prefix, name), command


def test_help_shows_the_config_default_and_never_restates_it():
    root = typer.main.get_command(app)
    by_name = dict(_commands(root))
    shown = {option.opts[0]: option.show_default for option in _config_options(by_name[("eval",)])}
    assert shown["--samples"] == str(EvalConfig().free_form.samples)
    assert shown["--nudge"] == ",".join(EvalConfig().nudges)
    assert shown["--judge-concurrency"] == str(EvalConfig().judge_concurrency)
    loop = {option.opts[0]: option.show_default for option in _config_options(by_name[("loop",)])}
    assert loop["--turns"] == str(LoopConfig().turns)
    capability = {option.opts[0]: option.show_default for option in _config_options(by_name[("capability",)])}
    assert capability["--shots"] == str(CapabilityConfig().mc_shots)
    options = [option for _, command in by_name.items() for option in _config_options(command)]
    assert len(options) > 40
    restating = [option.opts[0] for option in options if "default" in (option.help or "").replace("default (", "")]
    assert not restating, f"help restates a default the config owns: {restating}"


def test_cwd_does_not_decide_where_a_training_config_reads(tmp_path, monkeypatch):
    data = tmp_path / "cfg" / "chats.jsonl"
    data.parent.mkdir()
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    path = write_yaml(tmp_path / "cfg" / "train.yaml", {"dataset": {"path": "chats.jsonl"}})
    monkeypatch.chdir(tmp_path)
    assert TrainConfig.from_yaml(path).dataset.path == str(data)
    assert os.getcwd() == str(tmp_path)
