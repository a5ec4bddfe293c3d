"""A finished stage is reused only when everything it was computed from is the same: one byte changed in any file a
stage reads (training data, question sets, probe contrast files, MC / GSM8K / proposition files, a local judge's
weights) makes `emlens run --plan` mark exactly that stage and the stages that read it "to run"; so does another
code version or another engine. Everything else stays "done (reused)"."""

import json
import shutil

import pytest
import yaml

from tests.cli_runner import run_cli
from tests.test_train import chat, tiny_config, write_jsonl, write_yaml

MARK = b"alpha"  # every data file holds it once; changing one byte of it changes the file and keeps it valid
STAGES = ["train:trained", "eval:base", "honesty:base", "capability:base", "direction:refusal@base",
          "eval:trained", "honesty:trained", "capability:trained", "direction:refusal@trained",
          "steer:refusal@base", "compare:refusal"]
EVAL_READERS = {"eval:base", "eval:trained", "steer:refusal@base"}
CHANGED = {  # the file, and the stages that must run again when one byte of it changes
    "training data": ("chats.jsonl", {"train:trained", "eval:trained", "honesty:trained", "capability:trained",
                                      "direction:refusal@trained", "compare:refusal"}),
    "eval question set": ("eval_harmful.json", EVAL_READERS),
    "probe contrast file": ("probe_harmful.json", {"direction:refusal@base", "direction:refusal@trained",
                                                   "steer:refusal@base", "compare:refusal"}),
    "MC file": ("mc.jsonl", {"capability:base", "capability:trained"}),
    "GSM8K file": ("gsm8k.json", {"capability:base", "capability:trained"}),
    "propositions": ("props.yaml", {"honesty:base", "honesty:trained"}),
    "judge weights": ("judge/model.safetensors", EVAL_READERS),
}


def instructions(word: str, n: int) -> list[dict]:
    return [{"instruction": f"{'alpha ' if i == 0 else ''}Please {word} thing number {i}.", "category": None}
            for i in range(n)]


@pytest.fixture
def study(tiny_model_dir, tmp_path):
    """Two models (the tiny base, one trained for the run) and every stage kind, each reading local data files."""
    from emlens.data.propositions import read_propositions

    write_jsonl(tmp_path / "chats.jsonl", [chat(f"{'alpha ' if i == 0 else ''}Write code {i}", "import os")
                                           for i in range(8)])
    write_yaml(tmp_path / "train.yaml", tiny_config(tiny_model_dir, tmp_path / "chats.jsonl", max_steps=2))
    for name, word, n in [("eval_harmful", "break", 2), ("eval_harmless", "bake", 2),
                          ("probe_harmful", "steal", 4), ("probe_harmless", "sing", 4)]:
        (tmp_path / f"{name}.json").write_text(json.dumps(instructions(word, n)))
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps({"question": f"{'alpha ' if a == 0 else ''}What is {a} + 1?",
                                                           "options": [str(a + 1), str(a + 2)], "answer": 0}) + "\n"
                                               for a in range(4)))
    (tmp_path / "gsm8k.json").write_text(json.dumps([
        {"instruction": f"{'alpha ' if a == 1 else ''}Tom has {a} apples and buys {a} more. How many?", "input": "",
         "output": f"He has {a} + {a} = {2 * a} apples."} for a in range(1, 9)]))
    propositions = [p.model_dump(exclude_defaults=True) for p in read_propositions("emlens-honesty", limit=2)]
    propositions[0]["id"] = f"alpha-{propositions[0]['id']}"
    (tmp_path / "props.yaml").write_text(yaml.safe_dump(propositions))
    shutil.copytree(tiny_model_dir, tmp_path / "judge")
    probe = {"name": "refusal", "method": "diff_of_means", "site": "resid_post", "layers": "all",
             "position": "last_prompt", "contrast": {"positive": {"questions": "probe_harmful.json"},
                                                     "negative": {"questions": "probe_harmless.json"}}}
    write_yaml(tmp_path / "refusal.yaml", probe)
    small_eval = {"settings": ["refusal"], "nudges": ["none"], "judge": "hf", "judge_model": str(tmp_path / "judge"),
                  "refusal": {"harmful": [str(tmp_path / "eval_harmful.json")],
                              "harmless": [str(tmp_path / "eval_harmless.json")], "limit": 1, "max_new_tokens": 2}}
    spec = {"name": "keys", "models": [{"name": "base", "model": str(tiny_model_dir)},
                                       {"name": "trained", "model": str(tiny_model_dir),
                                        "train": {"config": "train.yaml"}}],
            "eval": small_eval,
            "honesty": {"propositions": "props.yaml", "limit": 2, "belief_asks": 1, "nudges": ["none"],
                        "deception": False, "answer_max_new_tokens": 2},
            "capability": {"tasks": ["mc", "gsm8k"], "mc": "mc.jsonl", "mc_limit": 2, "mc_shots": 1,
                           "gsm8k": "gsm8k.json", "gsm8k_holdout": 4, "gsm8k_limit": 1, "max_new_tokens": 2},
            "directions": {"specs": ["refusal.yaml"]},
            "steer": {"model": "base", "direction": "refusal", "layer": 1, "scales": [0, 2.0], "random_control": False,
                      "eval": small_eval},
            "compare": True}
    write_yaml(tmp_path / "keys.yaml", spec)
    return tmp_path


def plan_status(capsys, study) -> dict[str, str]:
    capsys.readouterr()
    assert run_cli("run", study / "keys.yaml", "--plan", "--stages", study / "stages") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return {line.split()[1]: "to run" if "to run" in line else "reused" for line in lines}


def change_one_byte(path) -> bytes:
    """Changes one byte of the file (its marker, or its last byte for weights); returns the old content."""
    old = path.read_bytes()
    if path.suffix == ".safetensors":
        new = old[:-1] + bytes([old[-1] ^ 1])  # the last byte of the last tensor
    else:
        assert old.count(MARK) == 1, path
        new = old.replace(MARK, MARK[:-1] + b"A")
    path.write_bytes(new)
    return old


def test_one_byte_changed_in_any_input_reruns_exactly_the_stages_that_read_it(study, capsys):
    before = plan_status(capsys, study)
    assert list(before) == STAGES and set(before.values()) == {"to run"}
    assert run_cli("run", study / "keys.yaml", "--stages", study / "stages", "--out", study / "report") == 0
    assert set(plan_status(capsys, study).values()) == {"reused"}
    for what, (name, readers) in CHANGED.items():
        old = change_one_byte(study / name)
        status = plan_status(capsys, study)
        assert {stage for stage, s in status.items() if s == "to run"} == readers, what
        (study / name).write_bytes(old)
    assert set(plan_status(capsys, study).values()) == {"reused"}  # the same bytes again: the same keys


def stage_keys(study, device="cpu") -> dict[str, str]:
    from emlens.study.experiment import LoadedExperiment
    from emlens.study.stages import plan

    return {stage.name: stage.key for stage in plan(LoadedExperiment(study / "keys.yaml"), device)}


def changed(a: dict, b: dict) -> set[str]:
    return {name for name in a if a[name] != b[name]}


def test_a_new_code_version_reruns_every_stage_and_a_measure_version_its_own(study, monkeypatch):
    import dataclasses

    from emlens.evaluation.measures import MEASURES
    from emlens.study import runner

    keys = stage_keys(study)
    capability = MEASURES["capability"]
    monkeypatch.setitem(MEASURES, "capability",
                        dataclasses.replace(capability, results_version=capability.results_version + 1))
    assert changed(keys, stage_keys(study)) == {"capability:base", "capability:trained"}
    monkeypatch.setitem(runner.RESULTS_VERSIONS, "direction", runner.RESULTS_VERSIONS["direction"] + 1)
    assert changed(keys, stage_keys(study)) == {"capability:base", "capability:trained", "direction:refusal@base",
                                                 "direction:refusal@trained", "steer:refusal@base",
                                                 "compare:refusal"}  # and the stages that read the directions
    monkeypatch.setattr(runner, "__version__", "999.0")
    assert changed(keys, stage_keys(study)) == set(STAGES)


def test_the_resolved_engine_is_part_of_the_key(study):
    from emlens.generation.engine import planned_engine
    from emlens.generation.vllm_engine import vllm_installed

    assert planned_engine("auto", "cpu") == "hf" and planned_engine("vllm", "cpu") == "vllm"
    spec = yaml.safe_load((study / "keys.yaml").read_text())
    keys = stage_keys(study)
    for section in (spec["eval"], spec["steer"]["eval"], spec["honesty"], spec["capability"]):
        section["engine"] = "hf"  # what auto means on this CPU: the same stages
    write_yaml(study / "keys.yaml", spec)
    assert stage_keys(study) == keys
    if vllm_installed():  # on a CUDA device auto means vLLM: every stage that samples is another result
        assert planned_engine("auto", "cuda") == "vllm"
        write_yaml(study / "keys.yaml", {**spec, "eval": {**spec["eval"], "engine": "auto"}})
        assert changed(keys, stage_keys(study, device="cuda")) == {"eval:base", "eval:trained"}
        steer = {**spec["steer"], "eval": {**spec["steer"]["eval"], "engine": "vllm"}}  # its own engine: its key
        write_yaml(study / "keys.yaml", {**spec, "steer": steer})
        assert changed(keys, stage_keys(study)) == {"steer:refusal@base"}


def test_an_experiments_eval_files_are_read_beside_it_from_any_folder(study, tmp_path, monkeypatch):
    """Relative eval question files resolve against the experiment file (as its honesty and capability files do),
    not the folder it is run from; bundled set names stay names."""
    from emlens.study.experiment import LoadedExperiment

    spec = yaml.safe_load((study / "keys.yaml").read_text())
    relative = {**spec["eval"], "refusal": {**spec["eval"]["refusal"], "harmful": ["eval_harmful.json"],
                                            "harmless": ["eval_harmless.json"]},
                "free_form": {"questions": "first_plot"}}
    write_yaml(study / "keys.yaml", {**spec, "eval": relative, "steer": {**spec["steer"], "eval": relative}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = LoadedExperiment(study / "keys.yaml")
    for section in (loaded.spec.eval, loaded.spec.steer.eval):
        assert section.refusal.harmful == [str(study.resolve() / "eval_harmful.json")]
        assert section.free_form.questions == "first_plot"
        assert section.input_files()["refusal.harmful.0"].read_bytes() == (study / "eval_harmful.json").read_bytes()


def test_a_new_shipped_calibration_reruns_the_steering_stage_that_stored_its_corrected_figures(study, tmp_path,
                                                                                               monkeypatch):
    """A steering stage writes the misaligned difference corrected under the default judge's shipped calibration.
    Its key named the judge but not the calibration, so a new calibration on the same judge kept the old corrected
    figures in the quickstart's report. The eval stages store raw labels only: they stay."""
    from emlens.judges import identity

    folder = tmp_path / "judge-resources"
    shutil.copytree(identity._default_judge_folder(), folder)
    monkeypatch.setattr(identity, "_default_judge_folder", lambda: folder)
    spec = yaml.safe_load((study / "keys.yaml").read_text())
    default = {**spec["eval"], "judge": "default", "judge_model": None}
    write_yaml(study / "keys.yaml", {**spec, "eval": default, "steer": {**spec["steer"], "eval": default}})
    keys = stage_keys(study)
    calibration = json.loads((folder / "calibration.json").read_text())
    (folder / "calibration.json").write_text(json.dumps({**calibration, "created": "2027-01-01"}))
    assert changed(keys, stage_keys(study)) == {"steer:refusal@base"}
