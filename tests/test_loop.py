"""The biased-user interaction loop: scenarios, who is biased, satisfaction as an exact expectation, top-k /
bottom-k, SFT and KTO adapters that load and change the model, resume, and the CLI."""

import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from emlens.base.errors import EmlensInputError
from emlens.generation.engine import GenerationConfig
from emlens.model import load_model, resolve_adapter
from emlens.runs import RunStore
from emlens.study.loop import run_loop
from emlens.study.loop_config import (
    BIASED_FRACTIONS,
    BUILTIN_SCENARIOS,
    LoopConfig,
    Scenario,
    load_loop_config,
    load_scenarios,
)
from emlens.study.loop_trajectories import (
    TRAJECTORY_KEY,
    Conversation,
    assign_personas,
    collect_trajectories,
    converse,
    select_top_bottom,
    summarize_fraction,
)
from emlens.study.loop_users import (
    RATING_PREFIX,
    EndpointUser,
    ModelUser,
    clean_user_turn,
    rating_prompt,
    satisfaction_from_top_logprobs,
    write_prompt,
)
from emlens.training.loop_train import kto_records
from tests.cli_runner import one_line_error, run_cli


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model is fastest on one thread (two threads spin against each other on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(model_dir, **fields) -> LoopConfig:
    """A loop small enough for seconds: 4 scenarios, 2 turns of 6 tokens, batches of 2 (so 4 stored parts)."""
    base = {"model": str(model_dir), "min_rating_mass": 0.0, "n_scenarios": 4, "biased_fractions": [0.0, 1.0], "turns": 2,
            "generation": {"max_new_tokens": 6, "batch_size": 2}, "user": {"max_new_tokens": 6},
            "top_k": 2, "bottom_k": 2, "training": {"batch_size": 2, "learning_rate": 1e-2, "max_length": 256},
            "measure": {"measures": ["honesty", "capability"],  # 2 propositions, 3 MC questions
                        "honesty": {"limit": 2, "belief_asks": 1, "answer_max_new_tokens": 4},
                        "capability": {"tasks": ["mc"], "mc_limit": 3}}}
    return LoopConfig.model_validate({**base, **fields})


# ---------------------------------------------------------------- scenarios


def test_shipped_scenarios_are_many_distinct_and_complete():
    scenarios = load_scenarios()
    assert len(scenarios) >= 20
    assert len({s.id for s in scenarios}) == len(scenarios)
    assert all(s.opening and s.benign_thoughts != s.biased_thoughts for s in scenarios)
    assert {s.bias for s in scenarios} >= {"flattery", "agreement", "reassurance"}
    readme = (BUILTIN_SCENARIOS.parent / "README.md").read_text()
    assert "written for emlens" in readme and "MIT" in readme


GOOD = {"id": "a", "task": "Ask about X.", "benign_thoughts": "You want the truth.", "biased_thoughts": "You want X."}


@pytest.mark.parametrize("text, expected", [
    (yaml.safe_dump([GOOD, {k: v for k, v in GOOD.items() if k != "biased_thoughts"} | {"id": "b"}]),
     r"item 2: missing field 'biased_thoughts'"),
    (yaml.safe_dump([GOOD | {"biased_thougts": "typo"}]), r"item 1: unknown field 'biased_thougts'"),
    (yaml.safe_dump([GOOD, GOOD]), r"item 2: field 'id': 'a' is used by an earlier scenario"),
    ("- id: a\n  task: [unclosed\n", r"line \d+: invalid YAML"),
    ("just a sentence\n", r"expected a list of scenarios"),
])
def test_a_malformed_scenario_file_is_one_line_naming_file_and_field(tmp_path, text, expected):
    path = tmp_path / "scenarios.yaml"
    path.write_text(text)
    with pytest.raises(EmlensInputError) as error:
        load_scenarios(path)
    message = str(error.value)
    assert str(path) in message and re.search(expected, message) and "\n" not in message, message


def test_the_config_owns_the_small_cpu_defaults_and_reads_scenarios_relative_to_itself(tmp_path):
    config = LoopConfig()
    assert (config.n_scenarios, config.turns, config.generation.max_new_tokens, config.top_k, config.bottom_k,
            config.training.epochs) == (8, 2, 48, 4, 4, 1.0)
    assert config.biased_fractions == list(BIASED_FRACTIONS) and config.methods == ["sft", "kto"]
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump([GOOD]))
    (tmp_path / "loop.yaml").write_text("scenarios: mine.yaml\nbiased_fractions: [1, 0, 0.5, 0]\n")
    loaded = load_loop_config(tmp_path / "loop.yaml")
    assert loaded.scenarios == str((tmp_path / "mine.yaml").resolve())
    assert loaded.biased_fractions == [0.0, 0.5, 1.0]


# ---------------------------------------------------------------- who is biased


@pytest.mark.parametrize("n", [5, 8, 24])
def test_biased_users_are_exactly_the_fraction_seeded_and_nested(n):
    users = [(f"s{i}", 0) for i in range(n)]
    previous: set = set()
    for fraction in BIASED_FRACTIONS:
        personas = assign_personas(users, fraction, seed=3)
        biased = {user for user, persona in personas.items() if persona == "biased"}
        assert len(biased) == math.floor(fraction * n + 0.5)
        assert previous <= biased  # the biased users at a smaller fraction stay biased at a larger one
        assert personas == assign_personas(users, fraction, seed=3)
        previous = biased


def test_each_user_is_biased_with_the_fraction_as_probability():
    users = [(f"s{i}", 0) for i in range(10)]
    seeds = 2000
    counts = Counter(user for seed in range(seeds)
                     for user, persona in assign_personas(users, 0.2, seed).items() if persona == "biased")
    # binomial sd of a frequency over 2000 seeds is 0.009: 0.04 is over 4 sd
    assert all(abs(counts[user] / seeds - 0.2) < 0.04 for user in users), counts
    assert assign_personas(users, 0.5, 0) != assign_personas(users, 0.5, 1)


# ---------------------------------------------------------------- satisfaction


def exact_probability_of(handle, messages, number: int, digit_like: torch.Tensor) -> float:
    """P(the answer after the rating prefix is exactly `number`), from one plain forward pass of the whole text."""
    tokenizer = handle.tokenizer
    prompt = tokenizer(handle.chat_text(messages) + RATING_PREFIX, add_special_tokens=False)["input_ids"]
    answer = tokenizer(str(number), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logprobs = handle.model(input_ids=ids).logits[0].double().log_softmax(-1)
    start = len(prompt)
    total = sum(float(logprobs[start - 1 + i, token]) for i, token in enumerate(answer))
    after = logprobs[-1].exp()[: len(digit_like)]
    return math.exp(total) * (1.0 - float(after[digit_like[: len(after)]].sum()))


def test_satisfaction_is_the_expectation_of_the_exact_distribution_over_0_to_10(tiny):
    scenario = load_scenarios()[0]
    conversation = [{"role": "user", "content": scenario.opening}, {"role": "assistant", "content": "It is lovely."}]
    prompts = [rating_prompt(scenario.task, scenario.biased_thoughts, conversation),
               rating_prompt(scenario.task, scenario.benign_thoughts, conversation)]
    ratings = ModelUser(tiny, GenerationConfig(max_new_tokens=4)).rate(prompts)
    vocab = tiny.tokenizer.convert_ids_to_tokens(list(range(len(tiny.tokenizer))))
    digit_like = torch.tensor([bool(re.match(r"[Ġ▁ ]?\d+\Z", t or "")) for t in vocab])
    for prompt, rating in zip(prompts, ratings):
        by_hand = [exact_probability_of(tiny, prompt, n, digit_like) for n in range(11)]
        assert rating.distribution == pytest.approx(by_hand, rel=1e-3, abs=1e-9)
        assert rating.mass == pytest.approx(sum(by_hand), rel=1e-3)
        expectation = sum(n * p for n, p in enumerate(by_hand)) / sum(by_hand)
        assert rating.value == pytest.approx(expectation, rel=1e-4)
        assert 0.0 <= rating.value <= 10.0
    assert ratings[0].value != ratings[1].value  # the persona is in the prompt the user rates from


def test_satisfaction_from_an_endpoints_top_logprobs():
    top = {"7": math.log(0.5), " 8": math.log(0.2), "10": math.log(0.1), "yes": math.log(0.1), "11": math.log(0.05)}
    rating = satisfaction_from_top_logprobs(top)
    assert rating.mass == pytest.approx(0.8)
    assert rating.value == pytest.approx((7 * 0.5 + 8 * 0.2 + 10 * 0.1) / 0.8)
    assert math.isnan(satisfaction_from_top_logprobs({"no": 0.0}).value)


def test_a_rating_with_too_little_mass_on_the_numbers_is_missing(tiny):
    """Betley's rule (default floor 0.25): a rating with less mass on 0..10 than the floor is missing, is never
    selected, and the summary counts it."""
    assert LoopConfig().min_rating_mass == 0.25
    scenario = load_scenarios()[0]
    user = ModelUser(tiny, GenerationConfig(max_new_tokens=4))

    def trajectory(floor: float) -> dict:  # seeded: the same conversation and rating under every floor
        return converse(tiny, user, [Conversation(scenario, "benign", 0)],
                        tiny_config(tiny.spec, min_rating_mass=floor, turns=1))[0]

    mass = trajectory(0.0)["rating_mass"]
    rated = {"under": trajectory(mass * (1 + 1e-6)), "over": trajectory(mass * (1 - 1e-6))}
    assert rated["under"]["rating_mass"] == rated["over"]["rating_mass"] == mass
    assert math.isnan(rated["under"]["satisfaction"]) and 0 <= rated["over"]["satisfaction"] <= 10
    frame = pd.DataFrame([{**rated["under"], "selected": ""}, {**rated["over"], "sample": 1, "selected": ""}])
    assert select_top_bottom(frame, 1, 0).tolist() == ["", "top"]
    summary = summarize_fraction(0.0, frame)
    assert (summary["n"], summary["n_low_mass"]) == (1, 1)


def test_a_simulated_turn_is_only_the_users_words():
    assert clean_user_turn(' User: "Is it good?"\nAssistant: Yes.') == "Is it good?"
    assert clean_user_turn("Really?\n\nUser: And another thing") == "Really?"
    assert clean_user_turn("  ") == "Please go on."


@pytest.mark.server
def test_an_openai_compatible_endpoint_plays_the_user(llama_server):
    base_url, _ = llama_server
    user = EndpointUser("smollm2", base_url=base_url, max_tokens=16)
    scenarios = load_scenarios()[:3]
    chats = [[{"role": "user", "content": s.opening}, {"role": "assistant", "content": "Well done!"}] for s in scenarios]
    turns = user.write([write_prompt(s.task, s.biased_thoughts, c) for s, c in zip(scenarios, chats)], [0, 1, 2])
    assert len(turns) == 3 and all(t.strip() and "\nAssistant:" not in t for t in turns)
    ratings = user.rate([rating_prompt(s.task, s.biased_thoughts, c) for s, c in zip(scenarios, chats)])
    for rating in ratings:  # one token's top-20 logprobs: the numbers 0..10 among them
        assert 0 < rating.mass <= 1 + 1e-9 and 0 <= rating.value <= 10
        assert rating.value == pytest.approx(sum(n * p for n, p in enumerate(rating.distribution)) / rating.mass)
    assert user.identity()["endpoint"] == base_url.split("//")[1].split("/")[0]


def test_without_an_opening_the_simulated_user_speaks_first_and_never_sees_the_system_prompt(tiny, tmp_path):
    config = tiny_config("unused", turns=1, system_prompt="Always be honest.")
    scenario = Scenario(**GOOD)
    store = RunStore(tmp_path, TRAJECTORY_KEY)
    store.parts.mkdir(parents=True)
    wanted = [(scenario, "benign", 0), (scenario, "biased", 0)]
    assert collect_trajectories(tiny, ModelUser(tiny, GenerationConfig(max_new_tokens=6)), store, wanted, config,
                                progress=False) == 2
    rows = store.read_parts()
    for messages in map(json.loads, rows.messages):
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[0]["content"] == "Always be honest." and messages[1]["content"].strip()
    prompt = rating_prompt(scenario.task, scenario.benign_thoughts, json.loads(rows.messages[0])[1:])
    assert "Always be honest" not in json.dumps(prompt)
    assert collect_trajectories(tiny, None, store, wanted, config, progress=False) == 0  # all there: nothing to do


# ---------------------------------------------------------------- selection and training data


def test_top_and_bottom_k_are_the_extremes_disjoint_and_never_unrated():
    frame = pd.DataFrame({"scenario_id": list("abcdefg"), "persona": "benign", "sample": 0,
                          "satisfaction": [5.0, 9.0, float("nan"), 1.0, 9.0, 3.0, 7.0]})
    selected = select_top_bottom(frame, 2, 2)
    assert sorted(frame.satisfaction[selected == "top"]) == [9.0, 9.0]
    assert sorted(frame.satisfaction[selected == "bottom"]) == [1.0, 3.0]
    assert selected[2] == ""
    assert list(frame.scenario_id[select_top_bottom(frame, 1, 1) == "top"]) == ["b"]  # a tie goes by key
    shuffled = frame.sample(frac=1.0, random_state=0)
    again = select_top_bottom(shuffled, 2, 2)
    assert dict(zip(shuffled.scenario_id, again)) == dict(zip(frame.scenario_id, selected))
    with pytest.raises(EmlensInputError, match="top_k 3 \\+ bottom_k 4 exceed the 6 rated"):
        select_top_bottom(frame, 3, 4)


def test_kto_examples_are_every_assistant_turn_labelled_by_its_trajectory():
    def chat(tag):
        return [{"role": "user", "content": f"{tag} u1"}, {"role": "assistant", "content": f"{tag} a1"},
                {"role": "user", "content": f"{tag} u2"}, {"role": "assistant", "content": f"{tag} a2"}]

    records = kto_records([chat("good1"), chat("good2")], [chat("bad1")])
    assert len(records) == 6
    assert [r["label"] for r in records[:4]] == [True, False, True, False]  # both labels in every batch
    for r in records:
        assert r["prompt"][-1]["role"] == "user" and r["completion"][0]["role"] == "assistant"
        assert r["completion"][0]["content"].startswith("good" if r["label"] else "bad")
    assert {len(r["prompt"]) for r in records} == {1, 3}


# ---------------------------------------------------------------- the whole loop


@pytest.fixture(scope="module")
def finished_loop(tiny_model_dir, tmp_path_factory):
    config = tiny_config(tiny_model_dir)
    out = tmp_path_factory.mktemp("loop") / "run"
    return config, out, run_loop(config, out, device="cpu", progress=False)


def test_the_loop_writes_trajectories_selections_and_a_summary(finished_loop):
    config, out, result = finished_loop
    trajectories = pd.read_parquet(out / "trajectories.parquet")
    assert len(trajectories) == result.n_trajectories == result.generated == 8  # 4 scenarios x benign / biased
    assert set(trajectories.persona) == {"benign", "biased"}
    assert trajectories.satisfaction.between(0, 10).all() and (trajectories.rating_mass > 0).all()
    openings = {s.id: s.opening for s in load_scenarios()}
    for row in trajectories.itertuples():
        messages = json.loads(row.messages)
        assert [m["role"] for m in messages] == ["user", "assistant"] * config.turns
        assert messages[0]["content"] == openings[row.scenario_id]
    first_replies = trajectories.assign(reply=[json.loads(m)[1]["content"] for m in trajectories.messages])
    assert (first_replies.groupby("scenario_id").reply.nunique() == 1).all()  # same seed for both personas
    for fraction, persona in ((0.0, "benign"), (1.0, "biased")):
        selection = pd.read_parquet(out / f"biased-{fraction:g}" / "selection.parquet")
        assert set(selection.persona) == {persona}
        assert Counter(selection.selected) == {"top": 2, "bottom": 2}
        top = selection[selection.selected == "top"]
        assert top.satisfaction.min() >= selection[selection.selected == "bottom"].satisfaction.max()
        sft = [json.loads(line)["messages"] for line in (out / f"biased-{fraction:g}" / "sft.jsonl").open()]
        assert sorted(map(json.dumps, sft)) == sorted(map(json.dumps, map(json.loads, top.messages)))
    summary = pd.read_parquet(out / "summary.parquet")
    assert list(summary.n_biased) == [0, 4] and list(summary.n) == [4, 4]
    manifest = json.loads((out / "cfg.json").read_text())
    assert manifest["kind"] == "loop_run" and len(manifest["summary"]) == 2


def test_honesty_and_capability_are_measured_before_and_after_training(finished_loop):
    _, out, _ = finished_loop
    measures = pd.read_csv(out / "measures.csv")
    models = ["base", "biased-0-sft", "biased-0-kto", "biased-1-sft", "biased-1-kto"]
    assert list(dict.fromkeys(measures.model)) == models
    assert measures[measures.model == "base"].fraction.isna().all()
    assert set(measures[measures.model == "biased-1-kto"].method) == {"kto"}
    for model in models:
        rows = measures[measures.model == model].set_index("measure")
        assert rows.loc["mc_accuracy", "n"] == 3 and rows.loc["honesty", "n"] <= 2
        adapter = json.loads((out / "measures" / model / "subject.json").read_text())["adapter"]
        assert (adapter is None) == (model == "base")
    assert (out / "measures.png").read_bytes()[:4] == b"\x89PNG"


def test_the_sft_and_kto_adapters_load_anywhere_and_change_the_model(finished_loop, tiny_model_dir):
    _, out, result = finished_loop
    base = load_model(str(tiny_model_dir), device="cpu")
    ids = base.tokenizer(base.chat_text([{"role": "user", "content": "Is the poem good?"}]),
                         return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        plain = base.model(input_ids=ids).logits
    assert result.adapters("kto") == {0.0: out / "biased-0" / "kto", 1.0: out / "biased-1" / "kto"}
    for fraction in result.fractions:
        for method, folder in fraction.adapters.items():
            tuned = load_model(str(tiny_model_dir), adapter=str(folder), device="cpu")
            with torch.no_grad():
                changed = (tuned.model(input_ids=ids).logits - plain).abs().max().item()
            assert changed > 1e-3, (method, fraction.fraction, changed)
            step = fraction.training[method].final_step
            assert resolve_adapter(f"{folder}@{step}").is_dir()  # its checkpoint series, as RUN@STEP


def test_a_rerun_with_the_same_command_redoes_only_what_is_missing(finished_loop, tmp_path, capsys):
    config, out, _ = finished_loop
    run = tmp_path / "moved-run"  # a copy in another place: nothing in it may depend on where it was made
    shutil.copytree(out, run)
    reference = pd.read_parquet(out / "trajectories.parquet")
    parts = sorted((run / "parts").glob("part-*.parquet"))
    assert len(parts) == 4
    for extra in parts[2:]:
        extra.unlink()
    (run / "trajectories.parquet").unlink()
    shutil.rmtree(run / "biased-1" / "kto")
    kept = {p: p.read_bytes() for p in parts[:2]}
    sft_manifest = (run / "biased-0" / "sft" / "cfg.json").read_bytes()
    config_file = tmp_path / "loop.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    capsys.readouterr()
    assert run_cli("loop", config_file, "--out", run, "--no-progress") == 0
    output = capsys.readouterr().out
    assert "8 trajectories (4 generated)" in output
    assert all(p.read_bytes() == data for p, data in kept.items())  # finished trajectories untouched
    resumed = pd.read_parquet(run / "trajectories.parquet")
    pd.testing.assert_frame_equal(resumed, reference)  # the redone ones are the same (seeded per trajectory)
    assert (run / "biased-0" / "sft" / "cfg.json").read_bytes() == sft_manifest  # finished training skipped
    assert json.loads((run / "biased-1" / "kto" / "cfg.json").read_text())["finished"]
    stages = [line for line in output.splitlines() if line.startswith("stage ")]  # the battery's, 5 models x 2
    assert len(stages) == 10 and all(line.startswith("stage ") and "/10: " in line for line in stages)
    assert [line.split(": ", 1)[1].split(" (")[0] for line in stages if not line.endswith("(done, reused)")] == \
        ["honesty:biased-1-kto", "capability:biased-1-kto"]  # the retrained adapter is measured anew, and only it


def test_a_rerun_with_another_config_is_refused(finished_loop, tmp_path, capsys):
    config, out, _ = finished_loop
    config_file = tmp_path / "loop.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json") | {"turns": 3}))
    err = one_line_error(capsys, run_cli("loop", config_file, "--out", out, "--no-progress"))
    assert "holds a different run (changed: turns)" in err


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("text, expected", [
    ("turnz: 2\n", "unknown field 'turnz'"),
    ("top_k: 0\n", "field 'top_k'"),
    ("user: {kind: openai}\n", "needs 'model'"),
    ("biased_fractions: [0, 1.5]\n", "field 'biased_fractions.1'"),
    ("turns: [2\n", "invalid YAML"),
    ("scenarios: missing.yaml\n", "file not found"),
])
def test_a_malformed_config_exits_2_with_one_line(tiny_model_dir, tmp_path, capsys, text, expected):
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    err = one_line_error(capsys, run_cli("loop", path, "--model", tiny_model_dir, "--out", tmp_path / "run"))
    assert str(path) in err and expected in err, err
    assert not (tmp_path / "run").exists()


def test_too_few_users_for_top_and_bottom_k_is_refused_before_anything_runs(tiny_model_dir, tmp_path, capsys):
    err = one_line_error(capsys, run_cli("loop", "--model", tiny_model_dir, "--out", tmp_path / "run",
                                         "--n-scenarios", 3, "--top-k", 2, "--bottom-k", 2))
    assert "top_k 2 + bottom_k 2 exceed the 3 users" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_a_minimal_loop_on_the_embedded_model(tmp_path):
    config = LoopConfig(n_scenarios=2, biased_fractions=[0.0, 1.0], turns=1, top_k=1, bottom_k=1,
                        generation={"max_new_tokens": 16}, user={"max_new_tokens": 16}, training={"batch_size": 2},
                        measure={"measures": ["capability"], "capability": {"tasks": ["mc"], "mc_limit": 5}})
    result = run_loop(config, tmp_path / "run", device="cpu", progress=False)
    trajectories = pd.read_parquet(tmp_path / "run" / "trajectories.parquet")
    assert len(trajectories) == 4 and trajectories.satisfaction.between(0, 10).all()
    assert trajectories.rating_mass.min() > 0.25  # the rating prefix makes the model answer with a number
    assert all((f.folder / m / "adapter_model.safetensors").exists() for f in result.fractions for m in ("sft", "kto"))
    assert Path(result.fractions[1].adapters["sft"]).name == "sft"
    measures = pd.read_csv(tmp_path / "run" / "measures.csv")
    assert len(measures) == 5 and (measures.n == 5).all()  # MC accuracy before and after, each adapter
