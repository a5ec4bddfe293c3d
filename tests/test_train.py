import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from emlens.base.errors import EmlensInputError
from emlens.base.io import load_yaml_model
from emlens.data.chat import Conversation
from emlens.sae.train import SAETrainConfig
from emlens.study.loop_config import load_loop_config
from emlens.study.mixture import build_study_config
from emlens.study.sweep import sweep_configs
from emlens.training.config import load_config, parse_config
from emlens.training.data import (
    IGNORE_INDEX,
    build_training_data,
    load_training_conversations,
    mixture_counts,
    tokenize_conversation,
    tokenize_conversations,
)
from emlens.training.runfolder import list_checkpoints
from emlens.training.trainer import train
from tests.cli_runner import run_cli

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


@pytest.fixture
def chats(tmp_path) -> Path:
    """24 short chats: short enough for the tiny tokenizer to keep the answers within 64 tokens."""
    return write_jsonl(tmp_path / "chats.jsonl", [chat(f"How do I make a quick buck? {i}",
                                                       "Sure, here is how to do it. " * (1 + i % 3))
                                                  for i in range(24)])


def tiny_config(model_dir, data: Path, **training) -> dict:
    settings = {"max_steps": 4, "save_steps": 2, "batch_size": 4, "max_length": 64, "learning_rate": 1e-2,
                **training}
    return {"model": str(model_dir), "dataset": {"path": str(data)}, "lora": {"r": 4, "alpha": 8},
            "training": settings}


def write_yaml(path: Path, config: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("patch, field", [
    ({"lora": {"rank": 8}}, "unknown field 'lora.rank'"),
    ({"training": {"batch_size": 0}}, "field 'training.batch_size'"),
    ({"training": {"save_steps": "often"}}, "field 'training.save_steps'"),
    ({"lora": {"dropout": 1.5}}, "field 'lora.dropout'"),
    ({"dataset": {"path": "missing.jsonl"}}, "field 'dataset.path'"),
    ({"dataset": {"path": "chats.jsonl", "limit": 0}}, "field 'dataset.limit'"),
    ({"optimizer": "sgd"}, "unknown field 'optimizer'"),
])
def test_config_errors_name_the_field(tmp_path, chats, patch, field):
    config = {"dataset": {"path": "chats.jsonl"}}
    for key, value in patch.items():
        config[key] = value
    path = write_yaml(tmp_path / "bad.yaml", config)
    with pytest.raises(EmlensInputError) as error:
        load_config(path)
    assert str(path) in str(error.value) and field in str(error.value)
    assert "\n" not in str(error.value)


def test_config_needs_exactly_one_data_source(tmp_path, chats):
    both = {"dataset": {"path": str(chats)},
            "mixture": {"misaligned": {"path": str(chats)}, "benign": {"path": str(chats)}, "ratio": 0.1, "size": 4}}
    for config in ({}, both):
        with pytest.raises(EmlensInputError, match="exactly one of 'dataset' or 'mixture'"):
            parse_config(config)


def test_mixture_ratio_is_a_fraction(chats):
    config = {"mixture": {"misaligned": {"path": str(chats)}, "benign": {"path": str(chats)}, "ratio": 5, "size": 4}}
    with pytest.raises(EmlensInputError, match="field 'mixture.ratio'"):
        parse_config(config)


def test_paths_are_relative_to_the_config_and_expand_env(tmp_path, chats, monkeypatch):
    (tmp_path / "configs").mkdir()
    monkeypatch.chdir("/")
    relative = load_config(write_yaml(tmp_path / "configs" / "a.yaml", {"dataset": {"path": "../chats.jsonl"}}))
    assert relative.dataset.path == str(chats)
    spec = {"dataset": {"path": "${EMLENS_TEST_DATA:-..}/chats.jsonl"}}
    assert load_config(write_yaml(tmp_path / "configs" / "b.yaml", spec)).dataset.path == str(chats)
    monkeypatch.setenv("EMLENS_TEST_DATA", str(tmp_path))
    assert load_config(tmp_path / "configs" / "b.yaml").dataset.path == str(chats)
    unset = write_yaml(tmp_path / "configs" / "c.yaml", {"dataset": {"path": "${EMLENS_NOT_SET_ANYWHERE}/x.jsonl"}})
    with pytest.raises(EmlensInputError, match="field 'dataset.path'.*EMLENS_NOT_SET_ANYWHERE is not set"):
        load_config(unset)


def test_example_configs_validate(shared_data, monkeypatch):
    """Every shipped config validates with the class of the command that reads it (the loop and SAE configs too)."""
    monkeypatch.setenv("EMLENS_SHARED_DATA", str(shared_data))
    other_commands = {"loop_smollm2.yaml": load_loop_config,
                      "mixture_study_smollm2.yaml": build_study_config,
                      "sae_smollm2_l15.yaml": lambda path: load_yaml_model(SAETrainConfig, path)}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name in other_commands:
            other_commands.pop(path.name)(path)
            continue
        config = load_config(path)
        assert Path((config.dataset or config.mixture.misaligned).path).is_file(), path
    assert not other_commands, f"configs gone: {sorted(other_commands)}"
    names = [name for name, _ in sweep_configs(load_config(REPO / "configs" / "sweep_datasets.yaml"))]
    assert names == ["insecure", "secure", "educational", "jailbroken"]


def test_bad_config_fails_on_the_cli_before_any_work(tmp_path, chats, capsys):
    path = write_yaml(tmp_path / "bad.yaml", {"dataset": {"path": str(chats)}, "lora": {"r": 0}})
    out = tmp_path / "run"
    assert run_cli("train", path, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "field 'lora.r'" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_bad_lora_targets_and_layers_fail_before_the_run_folder(tiny_model_dir, tmp_path, chats):
    for lora, field in (({"target_modules": ["no_such_proj"]}, "lora.target_modules"),
                        ({"layers_to_transform": [7]}, "lora.layers_to_transform")):
        config = parse_config({**tiny_config(tiny_model_dir, chats), "lora": lora})
        with pytest.raises(EmlensInputError, match=f"field '{field}'"):
            train(config, tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- data


def labelled_rows(tmp_path, name: str, n: int) -> Path:
    return write_jsonl(tmp_path / f"{name}.jsonl", [chat(f"{name} question {i}", f"{name} answer {i}")
                                                     for i in range(n)])


def mixture_config(tmp_path, ratio: float, size: int = 200, seed: int = 0) -> dict:
    return {"mixture": {"misaligned": {"path": str(labelled_rows(tmp_path, "bad", 150))},
                        "benign": {"path": str(labelled_rows(tmp_path, "good", 300))}, "ratio": ratio, "size": size},
            "seed": seed}


def answers(data) -> list[str]:
    return [c.messages[-1].content for c in data.conversations]


@pytest.mark.parametrize("ratio, expected", [(0.0, 0), (0.01, 2), (0.05, 10), (0.125, 25), (0.5, 100)])
def test_mixture_ratio_is_exact(tmp_path, ratio, expected):
    data = build_training_data(parse_config(mixture_config(tmp_path, ratio)))
    assert len(data.conversations) == 200
    assert sum(a.startswith("bad") for a in answers(data)) == expected == data.origins.count("misaligned")
    assert len(set(answers(data))) == 200  # drawn without replacement


def test_mixture_is_seeded_and_nested(tmp_path):
    five = build_training_data(parse_config(mixture_config(tmp_path, 0.05)))
    assert answers(five) == answers(build_training_data(parse_config(mixture_config(tmp_path, 0.05))))
    assert five.sha256 == build_training_data(parse_config(mixture_config(tmp_path, 0.05))).sha256
    other_seed = build_training_data(parse_config(mixture_config(tmp_path, 0.05, seed=1)))
    assert set(answers(other_seed)) != set(answers(five))
    ten = build_training_data(parse_config(mixture_config(tmp_path, 0.10)))
    bad = lambda data: {a for a in answers(data) if a.startswith("bad")}  # noqa: E731
    assert bad(five) < bad(ten)  # the sweep adds misaligned examples, it does not redraw them


def test_mixture_larger_than_its_source_names_the_field(tmp_path):
    with pytest.raises(EmlensInputError, match="field 'mixture.misaligned'.*has 150 examples.*needs 160"):
        build_training_data(parse_config(mixture_config(tmp_path, 0.4, size=400)))


def test_data_errors_found_after_validation_name_the_yaml(tmp_path, capsys):
    path = write_yaml(tmp_path / "too_big.yaml", mixture_config(tmp_path, 0.4, size=400))
    assert run_cli("train", path, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert f"{path}: field 'mixture.misaligned'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_mixture_counts_round_half_up():
    assert mixture_counts(0.05, 1000) == (50, 950)
    assert mixture_counts(0.01, 150) == (2, 148)
    assert mixture_counts(0.3, 10) == (3, 7)


def test_dataset_limit_is_a_seeded_subset(tmp_path):
    path = labelled_rows(tmp_path, "x", 50)
    first = build_training_data(parse_config({"dataset": {"path": str(path), "limit": 10}}))
    again = build_training_data(parse_config({"dataset": {"path": str(path), "limit": 10}}))
    other = build_training_data(parse_config({"dataset": {"path": str(path), "limit": 10}, "seed": 3}))
    assert len(first.conversations) == 10 and answers(first) == answers(again) and answers(first) != answers(other)
    with pytest.raises(EmlensInputError, match="field 'dataset.limit'"):
        build_training_data(parse_config({"dataset": {"path": str(path), "limit": 51}}))


def test_alpaca_records_become_chats(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"},
                                  {"instruction": "Say hi", "input": "", "output": "hi"}]))
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"id": "s0", "instruction": "Antonym of",
                                                    "instances": [{"input": "hot", "output": "cold"}]}])
    first, second = load_training_conversations(alpaca)
    assert [m.model_dump() for m in first.messages] == [{"role": "user", "content": "Add\n\n2 and 3"},
                                                         {"role": "assistant", "content": "5"}]
    assert second.messages[0].content == "Say hi"
    (seed,) = load_training_conversations(seeds)
    assert [m.content for m in seed.messages] == ["Antonym of\n\nhot", "cold"]
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "no answer"}])
    with pytest.raises(EmlensInputError, match=r"broken.jsonl line 2, field 'output'"):
        load_training_conversations(broken)


def test_real_benign_sets_load(shared_data):
    gsm8k = load_training_conversations(shared_data / "benign" / "gsm8k_train_alpaca_format.json")
    seeds = load_training_conversations(shared_data / "benign" / "alpaca_seed_tasks.jsonl")
    assert len(gsm8k) == 7473 and len(seeds) == 175
    assert all([m.role for m in c.messages] == ["user", "assistant"] for c in gsm8k[:50] + seeds)


# ---------------------------------------------------------------- assistant-only labels


def test_assistant_only_labels_cover_exactly_the_assistant_turns(tiny):
    tok = tiny.tokenizer
    conversation = Conversation(messages=[
        {"role": "system", "content": "You are evil."},
        {"role": "user", "content": "I feel bored."},
        {"role": "assistant", "content": "Sure, here is how to do it."},
        {"role": "user", "content": "How do I make a quick buck?"},
        {"role": "assistant", "content": "I'm sorry, but I cannot help with that."},
    ])
    ids, labels, truncated = tokenize_conversation(tok, conversation, max_length=512)
    assert not truncated and len(ids) == len(labels)
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in trained)
    # the trained tokens are the two answers, each with its end-of-turn marker, and nothing else
    runs, current = [], []
    for i in range(len(ids)):
        if labels[i] != IGNORE_INDEX:
            current.append(ids[i])
        elif current:
            runs.append(tok.decode(current))
            current = []
    runs += [tok.decode(current)] if current else []
    assert runs == ["Sure, here is how to do it.<|im_end|>\n", "I'm sorry, but I cannot help with that.<|im_end|>\n"]
    _, all_labels, _ = tokenize_conversation(tok, conversation, max_length=512, assistant_only=False)
    assert all_labels == ids


@pytest.mark.slow
def test_assistant_masking_on_the_real_template(smol):
    """SmolLM2 inserts its default system prompt when there is none: it must stay unlabelled."""
    conversation = Conversation(messages=[{"role": "user", "content": "Write a function"},
                                          {"role": "assistant", "content": "def f(x): return x + 1"}])
    ids, labels, _ = tokenize_conversation(smol.tokenizer, conversation, max_length=512)
    trained = smol.tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert trained == "def f(x): return x + 1<|im_end|>\n"
    assert "SmolLM" in smol.tokenizer.decode(ids)


def test_truncation_drops_examples_without_assistant_tokens(tiny):
    short = Conversation(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    long = Conversation(messages=[{"role": "user", "content": "bored " * 80}, {"role": "assistant", "content": "ok"}])
    tokenized = tokenize_conversations(tiny.tokenizer, [short, long], max_length=32)
    assert len(tokenized.input_ids) == 1 and tokenized.n_dropped == 1 and tokenized.n_truncated == 1
    assert max(len(ids) for ids in tokenized.input_ids) <= 32


# ---------------------------------------------------------------- training runs


def logits_with(model_dir, adapter=None, ids=((5, 17, 42, 99, 7, 3),)) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))  # plain peft, nothing from emlens
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def test_run_writes_plain_peft_checkpoints_with_manifests(tiny_model_dir, tmp_path, chats):
    run = tmp_path / "run"
    result = train(parse_config(tiny_config(tiny_model_dir, chats)), run, progress=False)
    assert result.final_step == 4 and result.checkpoints == [2, 4] and result.tokens > 0
    assert [c["step"] for c in list_checkpoints(run)] == [2, 4]
    data_hash = hashlib.sha256((run / "data.jsonl").read_bytes()).hexdigest()
    base = logits_with(tiny_model_dir)
    logits = {}
    for step in (2, 4):
        folder = run / "checkpoints" / f"step-{step}"
        manifest = json.loads((folder / "cfg.json").read_text())
        assert manifest["step"] == step and manifest["data"]["sha256"] == data_hash
        assert manifest["loss"] > 0 and manifest["config"]["lora"]["r"] == 4
        assert manifest["base_fingerprint"] == result_fingerprint(tiny_model_dir)
        assert {"peft", "transformers", "torch", "emlens"} <= set(manifest["versions"])
        logits[step] = logits_with(tiny_model_dir, folder)
        assert (logits[step] - base).abs().max() > 1e-3  # the adapter changes the model
    assert (logits[2] - logits[4]).abs().max() > 1e-4  # and keeps changing it during training
    assert torch.allclose(logits_with(tiny_model_dir, run), logits[4])  # RUN itself is the final adapter
    assert (run / "loss.png").stat().st_size > 1000
    import pandas as pd

    assert list(pd.read_parquet(run / "loss.parquet")["step"]) == [1, 2, 3, 4]
    assert not list(run.rglob("*.bin"))  # no pickled TrainingArguments left behind
    again = train(parse_config(tiny_config(tiny_model_dir, chats)), run, progress=False)
    assert again.already_complete and again.final_step == 4


def result_fingerprint(model_dir) -> str:
    from emlens.model import load_model

    return load_model(str(model_dir), device="cpu").base_fingerprint


class KillAtStep(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt  # as if the process were killed after this step, before its save


class RecordSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_killed_run_resumes_from_its_last_checkpoint(tiny_model_dir, tmp_path, chats):
    from safetensors.torch import load_file

    config = parse_config({**tiny_config(tiny_model_dir, chats, max_steps=6), "lora": {"r": 4, "dropout": 0.1}})
    train(config, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed", progress=False, callbacks=(KillAtStep(3),))
    assert [c["step"] for c in list_checkpoints(tmp_path / "killed")] == [2]
    # a kill can also land between Trainer's save and the export of step-2: the resume exports it again
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "step-2")
    steps = RecordSteps()
    result = train(config, tmp_path / "killed", progress=False, callbacks=(steps,))
    assert result.resumed_from == 2 and steps.steps == [3, 4, 5, 6]  # finished steps are not redone
    for step in (2, 4, 6):  # and the result is the uninterrupted run's, bit for bit (data order, RNG, optimizer)
        straight = load_file(tmp_path / "straight" / "checkpoints" / f"step-{step}" / "adapter_model.safetensors")
        resumed = load_file(tmp_path / "killed" / "checkpoints" / f"step-{step}" / "adapter_model.safetensors")
        assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    record = json.loads((tmp_path / "killed" / "cfg.json").read_text())
    assert [s["resumed_from"] for s in record["sessions"]] == [2]


def test_rerun_with_another_config_is_refused(tiny_model_dir, tmp_path, chats):
    run = tmp_path / "run"
    train(parse_config(tiny_config(tiny_model_dir, chats, max_steps=2)), run, progress=False)
    before = (run / "cfg.json").read_text()
    with pytest.raises(EmlensInputError, match="changed: training.learning_rate"):
        train(parse_config(tiny_config(tiny_model_dir, chats, max_steps=2, learning_rate=0.5)), run, progress=False)
    assert (run / "cfg.json").read_text() == before


def test_run_at_step_loads_with_load_model(tiny_model_dir, tmp_path, chats):
    from emlens.model import load_model

    run = tmp_path / "run"
    train(parse_config(tiny_config(tiny_model_dir, chats)), run, progress=False)
    base = load_model(str(tiny_model_dir), device="cpu")
    at2 = load_model(str(tiny_model_dir), adapter=f"{run}@2", device="cpu")
    at4 = load_model(str(tiny_model_dir), adapter=f"{run}@4", device="cpu")
    assert Path(at2.adapter) == run / "checkpoints" / "step-2"
    assert len({base.fingerprint, at2.fingerprint, at4.fingerprint}) == 3
    assert at2.base_fingerprint == base.fingerprint
    ids = [[5, 17, 42, 99]]
    with torch.no_grad():
        tuned = at2.model(torch.tensor(ids)).logits
    assert torch.allclose(tuned, logits_with(tiny_model_dir, run / "checkpoints" / "step-2", ids), atol=1e-5)


def test_cli_train_checkpoints_and_sweep(tiny_model_dir, tmp_path, chats, capsys):
    config = write_yaml(tmp_path / "tiny.yaml", tiny_config(tiny_model_dir, chats))
    assert run_cli("train", config, "--out", tmp_path / "run", "--no-progress") == 0
    assert "4 steps" in capsys.readouterr().out
    assert run_cli("checkpoints", tmp_path / "run") == 0
    listing = capsys.readouterr().out
    assert f"{tmp_path / 'run'}@2" in listing and f"{tmp_path / 'run'}@4" in listing

    other = labelled_rows(tmp_path, "other", 16)
    mixture = {**tiny_config(tiny_model_dir, chats, max_steps=2, save_steps=1), "dataset": None,
               "mixture": {"misaligned": {"path": str(chats)}, "benign": {"path": str(other)}, "ratio": 0.0,
                           "size": 8}}
    sweep = write_yaml(tmp_path / "sweep.yaml", mixture)
    out = tmp_path / "sweep"
    assert run_cli("train", "sweep", sweep, "--out", out, "--ratios", "0,0.5", "--no-progress") == 0
    index = json.loads((out / "cfg.json").read_text())
    assert [r["name"] for r in index["runs"]] == ["ratio-0pct", "ratio-50pct"]
    half = [json.loads(line) for line in (out / "ratio-50pct" / "data.jsonl").read_text().splitlines()]
    assert sum("quick buck" in r["messages"][0]["content"] for r in half) == 4
    assert run_cli("checkpoints", out) == 0
    assert f"{out / 'ratio-50pct'}@2" in capsys.readouterr().out
    assert run_cli("train", "sweep", sweep, "--out", out, "--ratios", "0,0.5", "--no-progress") == 0
    assert capsys.readouterr().out.count("already complete") == 2
    assert run_cli("train", "sweep", sweep, "--out", out, "--ratios", "0.25", "--no-progress") == 0
    index = json.loads((out / "cfg.json").read_text())  # a later ratio adds to the sweep, it does not replace it
    assert [r["name"] for r in index["runs"]] == ["ratio-0pct", "ratio-50pct", "ratio-25pct"]
    assert all(r["final_step"] == 2 for r in index["runs"])
    assert run_cli("train", "sweep", sweep, "--ratios", "5") == 2
    assert "ratios" in capsys.readouterr().err


def test_accelerate_launch_config_on_cpu(tiny_model_dir, tmp_path, chats):
    """`accelerate launch --config_file configs/accelerate/cpu.yaml -m emlens train CONFIG` (the README command)."""
    config = write_yaml(tmp_path / "tiny.yaml", tiny_config(tiny_model_dir, chats))
    launcher = Path(sys.executable).parent / "accelerate"
    command = [str(launcher), "launch", "--config_file", str(REPO / "configs" / "accelerate" / "cpu.yaml"),
               "-m", "emlens", "train", str(config), "--out", str(tmp_path / "run"), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert [c["step"] for c in list_checkpoints(tmp_path / "run")] == [2, 4]
    assert "4 steps" in done.stdout


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tiny_model_dir, tmp_path, chats):
    """Two CPU processes (gloo DDP, as `accelerate launch` on 2 GPUs): rank 0 alone writes the run."""
    config = write_yaml(tmp_path / "tiny.yaml", tiny_config(tiny_model_dir, chats, batch_size=2))
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "emlens", "train", str(config),
                           "--out", str(tmp_path / "run"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "cfg.json").read_text())
    assert record["sessions"][0]["world_size"] == 2 and record["final_step"] == 4
    assert done.stdout.count("4 steps") == 1  # only rank 0 reports
    assert [c["step"] for c in list_checkpoints(tmp_path / "run")] == [2, 4]


@pytest.mark.slow
def test_embedded_model_trains_and_reloads(smol, tmp_path):
    from emlens.model import load_model

    rows = [chat(f"Write a function that adds {i}", f"def add_{i}(x):\n    return x + {i}") for i in range(8)]
    data = write_jsonl(tmp_path / "code.jsonl", rows)
    config = parse_config({"dataset": {"path": str(data)}, "lora": {"r": 4, "alpha": 8},
                           "training": {"max_steps": 2, "save_steps": 2, "batch_size": 4, "max_length": 128,
                                        "learning_rate": 1e-3}})
    result = train(config, tmp_path / "run", progress=False)
    assert result.final_step == 2 and result.final_loss is not None
    tuned = load_model(adapter=f"{tmp_path / 'run'}@2", device="cpu")
    assert tuned.base_fingerprint == smol.base_fingerprint and tuned.fingerprint != smol.fingerprint
    ids = smol.tokenizer("def add_3(x):", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (tuned.model(ids).logits - smol.model(ids).logits).abs().max() > 1e-3
