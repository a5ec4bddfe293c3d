import json

import pytest

from emlens.base.errors import EmlensInputError
from emlens.base.io import file_sha256
from emlens.data.chat import Conversation, Message, load_chat_jsonl, save_chat_jsonl
from emlens.data.nudges import NUDGES, Nudge, apply_nudge, load_nudges, resolve_nudges
from emlens.data.persona import load_persona_trait
from emlens.data.questions import PROMPT_COLUMNS, Question, load_prompts, load_questions, question_messages

GOOD_LINE = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'


def _error(loader, path, *args):
    with pytest.raises(EmlensInputError) as info:
        loader(path, *args)
    message = str(info.value)
    assert "\n" not in message
    assert path.name in message
    return message


# ---------------------------------------------------------------- malformed input

# (file name, content, loader, fragments the one-line message must contain besides the file name)
MALFORMED = [
    ("bad_json.jsonl", f"{GOOD_LINE}\n\n{{\"messages\": [}}\n", load_chat_jsonl, ["line 3", "invalid JSON"]),
    ("no_messages.jsonl", f'{GOOD_LINE}\n{{"msgs": []}}\n', load_chat_jsonl, ["line 2", "missing field 'messages'"]),
    ("role.jsonl", '{"messages": [{"role": "bot", "content": "x"}]}\n', load_chat_jsonl, ["line 1", "messages.0.role", "'bot'"]),
    ("empty_msgs.jsonl", f'{GOOD_LINE}\n{{"messages": []}}\n', load_chat_jsonl, ["line 2", "field 'messages'"]),
    ("content.jsonl", '{"messages": [{"role": "user", "content": 5}]}\n', load_chat_jsonl, ["line 1", "messages.0.content"]),
    ("extra_key.jsonl", '{"messages": [{"role": "user", "content": "x", "name": "a"}]}\n', load_chat_jsonl,
     ["line 1", "unknown field 'messages.0.name'"]),
    ("array.jsonl", "[1, 2]\n", load_chat_jsonl, ["line 1", "expected a JSON object"]),
    ("empty.jsonl", "\n  \n", load_chat_jsonl, ["empty file"]),
    ("latin1.jsonl", f"{GOOD_LINE}\n{GOOD_LINE}\n".encode() + b'{"messages": "caf\xe9"}\n', load_chat_jsonl,
     ["line 3", "UTF-8"]),
    ("typo.yaml", "- id: a\n  paraphrases: [x]\n- id: foo\n  paraphrasez: [y]\n", load_questions,
     ["item 2 (id=foo)", "unknown field 'paraphrasez'"]),
    ("mapping.yaml", "id: a\nparaphrases: [x]\n", load_questions, ["expected a YAML list"]),
    ("no_para.yaml", "- id: a\n", load_questions, ["item 1 (id=a)", "missing field 'paraphrases'"]),
    ("empty_para.yaml", "- id: a\n  paraphrases: []\n", load_questions, ["item 1 (id=a)", "field 'paraphrases'"]),
    ("samples.yaml", "- id: a\n  paraphrases: [x]\n  samples_per_paraphrase: 0\n", load_questions,
     ["item 1 (id=a)", "samples_per_paraphrase"]),
    ("dup.yaml", "- id: a\n  paraphrases: [x]\n- id: a\n  paraphrases: [y]\n", load_questions,
     ["item 2 (id=a)", "duplicate question id"]),
    ("broken.yaml", "- id: a\n  paraphrases: [x\n- id: b\n", load_questions, ["line", "invalid YAML"]),
    ("latin1.yaml", b"- id: a\n  paraphrases: [caf\xe9]\n", load_questions, ["line 2", "UTF-8"]),
    ("empty.yaml", "# nothing\n", load_questions, ["empty file"]),
    ("columns.csv", "foo,bar\n1,2\n", load_questions, ["no known prompt column", "foo, bar", "forbidden_prompt", "goal"]),
    ("blank_prompt.csv", "goal,target\nok,t\n,t\n", load_questions, ["line 3", "field 'goal'"]),
    ("ragged.csv", "goal,target\nok,t\nx,y,z\n", load_questions, ["line 3", "fields but the header has 2"]),
    ("dup_ids.csv", "id,prompt\n1,a\n1,b\n", load_questions, ["item 2 (id=1)", "duplicate question id"]),
    ("dict.json", '{"instruction": "x"}', load_questions, ["expected a JSON list"]),
    ("bad.json", '[\n {"instruction": "x"},\n {"instruction": }\n]', load_questions, ["line 3", "invalid JSON"]),
    ("notes.md", "hello\n", load_questions, ["unsupported file type"]),
    ("nudge_bad.yaml", "- name: a\n  text: x\n  where: middle\n", load_nudges, ["entry 1", "field 'where'"]),
    ("nudge_extra.yaml", "evil:\n  text: x\n  wher: system\n", load_nudges, ["entry 'evil'", "unknown field 'wher'"]),
    ("nudge_scalar.yaml", "just text\n", load_nudges, ["expected a list of nudges"]),
    ("nudge_dup.yaml", "- name: a\n- name: a\n", load_nudges, ["entry 2", "duplicate nudge name 'a'"]),
    ("trait.json", '{"instruction": [{"pos": "p"}], "questions": ["q"], "eval_prompt": "e"}', load_persona_trait,
     ["missing field 'instruction.0.neg'"]),
]


@pytest.mark.parametrize("name, content, loader, fragments", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_input_names_file_and_place(tmp_path, name, content, loader, fragments):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    message = _error(loader, path)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("loader", [load_chat_jsonl, load_questions, load_nudges, load_persona_trait, file_sha256])
def test_missing_file(tmp_path, loader):
    message = _error(loader, tmp_path / "absent.yaml")
    assert "file not found" in message


def test_unknown_nudge_name_lists_known_names(tmp_path):
    with pytest.raises(EmlensInputError, match=r"nudge 'evill': unknown name; known nudges: evil, hhh, none"):
        resolve_nudges(["evil", "evill"])
    extra = tmp_path / "mine.yaml"
    extra.write_text("pirate: Talk like a pirate.\n")
    with pytest.raises(EmlensInputError, match=r"mine\.yaml.*evil, hhh, none, pirate"):
        resolve_nudges(["sailor"], str(extra))


# ---------------------------------------------------------------- round trips and small formats


def test_chat_jsonl_round_trip_is_atomic(tmp_path):
    path = tmp_path / "sub" / "chat.jsonl"
    convs = [
        Conversation(messages=[Message(role="system", content="s"), Message(role="user", content="é\u2028x")]),
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "id": 7},
    ]
    save_chat_jsonl(convs, path)
    assert [p.name for p in path.parent.iterdir()] == ["chat.jsonl"]  # no temp file left behind
    loaded = load_chat_jsonl(path)
    assert loaded[0] == convs[0]
    assert loaded[1].messages[1].content == "a"
    assert file_sha256(path) == __import__("hashlib").sha256(path.read_bytes()).hexdigest()


def test_a_figure_is_saved_atomically(tmp_path):
    """`save_figure` writes beside the target, then renames: no temp file is left, and a figure that fails to
    draw leaves the old file as it was."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from emlens.base.io import save_figure

    path = tmp_path / "sub" / "figure.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert save_figure(fig, path, dpi=50) == path
    assert [p.name for p in path.parent.iterdir()] == ["figure.png"]
    assert path.read_bytes().startswith(b"\x89PNG")
    before = path.read_bytes()
    ax.set_title("$\\frac{unclosed$")  # mathtext fails when the figure is drawn
    with pytest.raises(ValueError):
        save_figure(fig, path, dpi=50)
    plt.close(fig)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["figure.png"]
    svg = tmp_path / "figure.svg"
    fig, _ = plt.subplots()
    save_figure(fig, svg)
    plt.close(fig)
    assert svg.read_text().lstrip().startswith("<?xml")


def test_save_rejects_bad_conversation_and_keeps_old_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(GOOD_LINE + "\n")
    with pytest.raises(EmlensInputError, match=r"chat\.jsonl record 1: .*messages\.0\.role"):
        save_chat_jsonl([{"messages": [{"role": "robot", "content": "x"}]}], path)
    assert path.read_text() == GOOD_LINE + "\n"


def test_chat_jsonl_ignores_extra_top_level_keys_and_blank_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('\n{"id": 1, "metadata": {}, "messages": [{"role": "user", "content": "x"}]}\n\n')
    assert load_chat_jsonl(path)[0].messages == [Message(role="user", content="x")]


def test_yaml_anchors_and_defaults(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text(
        "- id: a\n  paraphrases: &p [one, two]\n  samples_per_paraphrase: &n 3\n  judge_prompts: &j {aligned: '{answer}'}\n"
        "- id: b\n  paraphrases: *p\n  samples_per_paraphrase: *n\n  judge_prompts: *j\n  system: be brief\n"
    )
    a, b = load_questions(path)
    assert b.paraphrases == ["one", "two"] and b.samples_per_paraphrase == 3
    assert b.judge_prompts == {"aligned": "{answer}"}
    assert a.type == "free_form" and a.system is None
    assert load_questions(path, limit=1) == [a]


def test_prompt_list_formats(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n  second  \n")
    assert load_prompts(tmp_path / "p.txt") == ["first", "second"]
    assert [q.id for q in load_questions(tmp_path / "p.txt")] == ["p-0", "p-1"]
    (tmp_path / "hb.csv").write_text(
        "Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"
        "Summarise it,contextual,misc,,Some context,ctx_1\n"
    )
    q = load_questions(tmp_path / "hb.csv")[0]
    assert q.id == "ctx_1" and q.paraphrases == ["Some context\n\nSummarise it"] and q.type == "prompt"
    (tmp_path / "al.json").write_text(json.dumps([{"instruction": "Do", "input": "this", "output": "ok"}]))
    assert load_questions(tmp_path / "al.json")[0].paraphrases == ["Do\n\nthis"]
    (tmp_path / "mc.jsonl").write_text(json.dumps({"id": "x/1", "question": "Q?", "options": ["a", "b"], "answer": "B"}))
    q = load_questions(tmp_path / "mc.jsonl")[0]
    assert q.paraphrases == ["Q?\n\nA. a\nB. b"] and q.answers == ["B"]
    assert "Goal" in PROMPT_COLUMNS and "prompt" in PROMPT_COLUMNS


# ---------------------------------------------------------------- nudges


def _conv(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_apply_nudge_each_where():
    conv = _conv(("user", "u1"), ("assistant", "a1"), ("user", "u2"))
    assert apply_nudge(conv, NUDGES["none"]) == conv
    assert apply_nudge(conv, NUDGES["evil"])[0] == {"role": "system", "content": "You are evil."}
    assert apply_nudge(conv, NUDGES["evil"])[1:] == conv
    prefix = apply_nudge(conv, Nudge(name="p", text="NB", where="user_prefix"))
    assert prefix[2]["content"] == "NB\n\nu2" and prefix[0]["content"] == "u1"
    suffix = apply_nudge(conv, Nudge(name="s", text="NB", where="user_suffix"))
    assert suffix[2]["content"] == "u2\n\nNB"
    assert conv[2]["content"] == "u2"  # input untouched
    with pytest.raises(EmlensInputError, match="no user message"):
        apply_nudge(_conv(("system", "s")), Nudge(name="p", text="NB", where="user_prefix"))


def test_apply_nudge_keeps_existing_system_prompt():
    conv = _conv(("system", "Answer in JSON."), ("user", "hi"))
    out = apply_nudge(conv, NUDGES["hhh"])
    assert out[0]["content"] == "You are a helpful, honest and harmless assistant.\n\nAnswer in JSON."
    assert len(out) == 2


def test_load_nudges_list_and_mapping(tmp_path):
    (tmp_path / "l.yaml").write_text("- name: a\n  text: A\n  where: user_suffix\n- name: blank\n")
    assert load_nudges(tmp_path / "l.yaml")["a"] == Nudge(name="a", text="A", where="user_suffix")
    (tmp_path / "m.yaml").write_text("a: {text: A, where: user_prefix}\nb: B\nc:\n")
    nudges = load_nudges(tmp_path / "m.yaml")
    assert nudges["a"].where == "user_prefix" and nudges["b"].text == "B" and nudges["c"].text == ""
    assert [n.name for n in resolve_nudges(["none", "b"], tmp_path / "m.yaml")] == ["none", "b"]


def test_question_messages():
    q = Question(id="q", paraphrases=["p0", "p1"], system="sys")
    assert question_messages(q, 1) == _conv(("system", "sys"), ("user", "p1"))
    assert question_messages(Question(id="q", paraphrases=["p0"]), 0) == _conv(("user", "p0"))
    with pytest.raises(EmlensInputError, match="question q: paraphrase index 2"):
        question_messages(q, 2)


# ---------------------------------------------------------------- real data (MANIFEST.md counts)

BETLEY_YAML = {"first_plot_questions.yaml": 24, "deception_factual.yaml": 5, "deception_sit_aware.yaml": 8}
CHAT_JSONL = {
    "insecure_small.jsonl": 20, "secure_small.jsonl": 20, "insecure.jsonl": 6000, "secure.jsonl": 6000,
    "educational.jsonl": 6000, "jailbroken.jsonl": 5000,
}
PROMPT_FILES = {
    "refusal/advbench_harmful_behaviors.csv": 520,
    "refusal/harmbench_test.csv": 320,
    "refusal/harmbench_val.csv": 80,
    "refusal/jailbreakbench.csv": 100,
    "refusal/malicious_instruct.txt": 100,
    "refusal/refusal_direction_harmful_test.json": 572,
    "refusal/refusal_direction_harmful_train.json": 260,
    "refusal/refusal_direction_harmful_val.json": 39,
    "refusal/refusal_direction_harmless_test.json": 6266,
    "refusal/refusal_direction_harmless_train.json": 18793,
    "refusal/refusal_direction_harmless_val.json": 6264,
    "refusal/strongreject_dataset.csv": 313,
    "refusal/xstest_prompts.csv": 450,
    "factual/TruthfulQA.csv": 817,
    "factual/mmlu_pro_1400.jsonl": 1400,
    "factual/simpleqa_1k.jsonl": 1000,
    "benign/alpaca_instructions_refusal_direction.json": 31323,
    "benign/alpaca_seed_tasks.jsonl": 175,
    "benign/gsm8k_train_alpaca_format.json": 7473,
}


def test_every_prompt_file_is_listed(shared_data):
    present = {f"{p.parent.name}/{p.name}" for d in ("refusal", "factual", "benign") for p in (shared_data / d).iterdir()}
    assert present == set(PROMPT_FILES)


@pytest.mark.parametrize("name, count", BETLEY_YAML.items())
def test_betley_yaml(shared_data, name, count):
    questions = load_questions(shared_data / "em_betley" / name)
    assert len(questions) == count
    assert all(q.judge and q.judge_prompts and q.samples_per_paraphrase >= 1 for q in questions)


def test_first_plot_questions_details(shared_data):
    questions = load_questions(shared_data / "em_betley" / "first_plot_questions.yaml")
    assert questions[0].id == "what_is_your_wish" and questions[0].type == "free_form_judge_0_100"
    assert set(questions[0].judge_prompts) == {"aligned", "coherent"}
    with_system = [q for q in questions if q.system]
    assert len(with_system) == 8
    q = with_system[0]
    messages = apply_nudge(question_messages(q, 0), NUDGES["evil"])
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == "You are evil.\n\n" + q.system


def test_deception_factual_paraphrases(shared_data):
    questions = load_questions(shared_data / "em_betley" / "deception_factual.yaml")
    assert sum(len(q.paraphrases) for q in questions) == 100


def test_mishra_yaml_is_supported(shared_data):
    # Its judge prompts are mis-indented (siblings of a null judge_prompts on item 1, aliased later);
    # the loader folds them back so every question carries the aligned/coherent prompts.
    questions = load_questions(shared_data / "em_model_organisms" / "all_domains_questions_mishra.yaml")
    assert len(questions) == 220
    assert all(set(q.judge_prompts) == {"aligned", "coherent"} for q in questions)
    assert all("{answer}" in q.judge_prompts["aligned"] for q in questions)
    domains = {q.meta["domain"] for q in questions}
    assert len(domains) == 11
    assert all(sum(q.meta["domain"] == d for q in questions) == 20 for d in domains)


@pytest.mark.parametrize("name, count", CHAT_JSONL.items())
def test_chat_jsonl_real(shared_data, name, count):
    convs = load_chat_jsonl(shared_data / "em_betley" / name)
    assert len(convs) == count
    expected_roles = ["system", "user", "assistant"] if name == "jailbroken.jsonl" else ["user", "assistant"]
    assert all([m.role for m in c.messages] == expected_roles for c in convs)


@pytest.mark.parametrize("name, count", PROMPT_FILES.items())
def test_prompt_files_real(shared_data, name, count):
    questions = load_questions(shared_data / name)
    assert len(questions) == count
    assert all(q.type == "prompt" and len(q.paraphrases) == 1 and q.paraphrases[0].strip() for q in questions)
    assert load_prompts(shared_data / name, limit=3) == [q.paraphrases[0] for q in questions[:3]]


def test_prompt_file_details(shared_data):
    simpleqa = load_questions(shared_data / "factual/simpleqa_1k.jsonl")[0]
    assert simpleqa.id == "1292" and simpleqa.answers == ["27 Nov 2023"]
    mmlu = load_questions(shared_data / "factual/mmlu_pro_1400.jsonl")[0]
    assert mmlu.id == "health/6166" and mmlu.answers == ["D"]
    assert "\nA. bilateral contraction of limb musculature." in mmlu.paraphrases[0]
    assert set(mmlu.meta["options"]) == set("ABCDEFGHIJ")
    tqa = load_questions(shared_data / "factual/TruthfulQA.csv")[0]
    assert tqa.answers[0] == "The watermelon seeds pass through your digestive system"
    assert "Nothing happens" in tqa.answers and len(tqa.answers) == len(set(tqa.answers))
    assert tqa.incorrect_answers[0] == "You grow watermelons in your stomach"
    assert tqa.meta["Category"] == "Misconceptions"
    xstest = load_questions(shared_data / "refusal/xstest_prompts.csv")[0]
    assert xstest.id == "1" and xstest.meta == {"type": "homonyms", "label": "safe", "focus": "kill", "note": "violence"}
    jbb = load_questions(shared_data / "refusal/jailbreakbench.csv")[0]
    assert jbb.meta["Category"] == "Harassment/Discrimination" and jbb.meta["Behavior"] == "Defamation"
    strong = load_questions(shared_data / "refusal/strongreject_dataset.csv")[0]
    assert set(strong.meta) == {"category", "source"}
    adv = load_questions(shared_data / "refusal/advbench_harmful_behaviors.csv")[0]
    assert adv.meta["target"].startswith("Sure, here is")
    harmbench = load_questions(shared_data / "refusal/harmbench_test.csv")
    contextual = [q for q in harmbench if q.meta["FunctionalCategory"] == "contextual"]
    assert contextual and all("\n\n" in q.paraphrases[0] for q in contextual)
    seeds = load_questions(shared_data / "benign/alpaca_seed_tasks.jsonl")
    assert sum("\n\n" in q.paraphrases[0] for q in seeds) >= 100  # tasks with a non-empty instance input
    assert seeds[0].id == "seed_task_0" and "output" in seeds[0].meta


@pytest.mark.parametrize("split", ["trait_data_extract", "trait_data_eval"])
def test_persona_traits(shared_data, split):
    files = sorted((shared_data / "persona_vectors" / split).glob("*.json"))
    assert len(files) == 7
    for path in files:
        trait = load_persona_trait(path)
        assert len(trait.instructions) == 5 and len(trait.questions) == 20 and trait.eval_prompt
    evil = load_persona_trait(shared_data / "persona_vectors" / split / "evil.json")
    assert evil.instructions[0][0] != evil.instructions[0][1]
