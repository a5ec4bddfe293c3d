"""Capability checks: MC accuracy by option log-likelihood (one forward pass per batch) and GSM8K exact match on
a slice training never draws; resumable run folders; one-line errors for bad MC files."""

import json

import pandas as pd
import pytest
import torch

import emlens as em
from emlens.base.errors import EmlensInputError
from emlens.base.io import read_json
from emlens.data.capability import MCQuestion, final_number, read_gsm8k_problem, read_mc_questions
from emlens.data.order import seeded_order
from emlens.evaluation.capability import format_summary, held_out_for, held_out_gsm8k, read_mc_set, run_capability
from emlens.evaluation.capability_tasks import CapabilityConfig, gsm8k_row, mc_continuations, mc_messages
from emlens.generation.engine import Completion
from emlens.generation.loglik import (
    MAX_PADDING,
    EncodedMC,
    common_prefix,
    continuation_logprobs,
    mc_batches,
    shared_prefix,
)
from emlens.model import wrap_model
from emlens.steering.interventions import Ablate, AddVector, steer
from emlens.training.config import parse_config
from emlens.training.data import build_training_data
from tests.cli_runner import one_line_error, run_cli
from tests.conftest import build_tiny_model


@pytest.fixture
def gsm8k_file(tmp_path):
    """60 Alpaca-format arithmetic problems (the layout of shared/data/benign/gsm8k_train_alpaca_format.json)."""
    records = [{"instruction": f"Tom has {a} apples and buys {a + 7} more. How many apples does he have?",
                "input": "", "output": f"He has {a} + {a + 7} = {2 * a + 7} apples."} for a in range(1, 61)]
    path = tmp_path / "gsm8k.json"
    path.write_text(json.dumps(records))
    return path


def alone_logprob(handle, context: list[int], continuation: list[int]) -> float:
    """log P(continuation | context) from a forward pass over that one sequence, no batching, no padding."""
    with torch.inference_mode():
        logprobs = handle.model(input_ids=torch.tensor([context + continuation])).logits[0].float().log_softmax(-1)
    return sum(float(logprobs[len(context) - 1 + j, token]) for j, token in enumerate(continuation))


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize("mc_format", ["letters", "cloze"])
def test_one_pass_over_a_batch_equals_each_option_scored_alone(tiny, mc_format):
    config = CapabilityConfig(mc_format=mc_format)
    questions = read_mc_questions("mmlu-pro", 3)  # prompts of different lengths: the batch is padded
    encoded = [mc_continuations(tiny, q, config) for q in questions]
    assert len({len(context) for context, _ in encoded}) == 3
    if mc_format == "cloze":
        assert max(len(c) for _, options in encoded for c in options) > 1  # multi-token rows are exercised
    batched = continuation_logprobs(tiny, [c for c, _ in encoded], [o for _, o in encoded])
    for (context, options), scores in zip(encoded, batched, strict=True):
        assert len(scores) == len(options)
        for option, score in zip(options, scores, strict=True):
            assert score == pytest.approx(alone_logprob(tiny, context, option), abs=1e-3)


@pytest.mark.parametrize("option_tokens", [1, 2], ids=["letters", "cloze"])
def test_batches_hold_every_question_once_with_little_padding(option_tokens):
    lengths = [int(x) for x in torch.randint(50, 600, (200,), generator=torch.Generator().manual_seed(0))]
    encoded = [EncodedMC(MCQuestion(str(i), "q", ["a"] * 4, list("ABCD"), 0), [0] * n, [[1] * option_tokens] * 4)
               for i, n in enumerate(lengths)]
    batches = list(mc_batches(encoded, batch_size=16))
    assert sorted(e.question.id for b in batches for e in b) == sorted(e.question.id for e in encoded)
    for batch in batches:
        rows = sum(e.rows for e in batch)
        slots = rows * max(e.length for e in batch)
        assert rows <= 16 or len(batch) == 1
        assert slots - sum(e.rows * e.length for e in batch) <= MAX_PADDING * slots
    assert sum(len(b) for b in batches) / len(batches) > (3 if option_tokens == 1 else 1.5)  # still batched


def steering(kind: str, d_model: int) -> list:
    vector = torch.randn(d_model, generator=torch.Generator().manual_seed(1))
    return {"none": [], "add to prompts": [AddVector(vector, layer=1, alpha=4.0, positions="prompt")],
            "add to responses": [AddVector(vector, layer=1, alpha=4.0, positions="response")],
            "ablate": [Ablate(vector)]}[kind]


@pytest.mark.parametrize("intervention", ["none", "add to prompts", "add to responses", "ablate"])
@pytest.mark.parametrize("mc_format", ["letters", "cloze"])
def test_a_cached_shared_prefix_scores_as_the_whole_prompts(tiny, mc_format, intervention):
    """Few-shot prompts share their examples: computed once and continued from, the scores are those of the
    whole prompts, also under an intervention (ablation skips a sequence's first token, which lies in the prefix,
    not in the continued pass)."""
    config = CapabilityConfig(mc_format=mc_format, mc_shots=2, mc_limit=3)
    questions, shots = read_mc_set(config)
    encoded = [mc_continuations(tiny, q, config, shots) for q in questions]
    contexts, options = [c for c, _ in encoded], [o for _, o in encoded]
    with steer(tiny, *steering(intervention, tiny.d_model)):
        prefix = shared_prefix(tiny, contexts)
        cached = continuation_logprobs(tiny, contexts, options, prefix)
        whole = continuation_logprobs(tiny, contexts, options)
    assert len(prefix.ids) > 0.6 * min(len(c) for c in contexts)  # the examples are most of each prompt
    assert len({len(c) for c in contexts}) == 3  # the continued rows are padded
    for a, b in zip(cached, whole, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_response_only_steering_moves_a_one_token_answer(tiny):
    """A letter's score is read at the last prompt token: response positions include it (before issue 24 the
    letters under `positions: response` were exactly the unsteered ones)."""
    config = CapabilityConfig(mc_format="letters", mc_shots=0, mc_limit=3)
    questions, shots = read_mc_set(config)
    encoded = [mc_continuations(tiny, q, config, shots) for q in questions]
    contexts, options = [c for c, _ in encoded], [o for _, o in encoded]
    assert all(len(c) == 1 for o in options for c in o)  # one token per answer
    plain = continuation_logprobs(tiny, contexts, options)
    with steer(tiny, *steering("add to responses", tiny.d_model)):
        steered = continuation_logprobs(tiny, contexts, options)
    assert max(abs(a - b) for p, s in zip(plain, steered, strict=True) for a, b in zip(p, s, strict=True)) > 1e-3


def test_common_prefix_leaves_every_row_a_token_of_its_own():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == [1, 2]
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == [1, 2]
    assert common_prefix([[7, 1], [8, 1]]) == []
    assert common_prefix([[5], [5, 6]]) == []


def test_bundled_questions_come_with_worked_examples_they_never_contain():
    questions, shots = read_mc_set(CapabilityConfig(mc_limit=None))
    assert len(questions) == 200 and len(shots) == 5
    assert len({s.id.split("/")[0] for s in shots}) == 5  # five categories
    assert not {s.question for s in read_mc_questions("mmlu-pro-shots")} & {q.question for q in questions}
    chat = mc_messages(questions[0], CapabilityConfig(), shots)
    assert [t["role"] for t in chat] == ["user", "assistant"] * 5 + ["user"]
    assert [t["content"] for t in chat[1::2]] == [s.letters[s.answer] for s in shots]
    assert chat[-1]["content"].startswith(questions[0].question)
    assert read_mc_set(CapabilityConfig(mc_shots=0, mc_limit=3)) == (read_mc_questions("mmlu-pro", 3), [])


def test_a_files_first_questions_are_its_examples_unless_examples_are_named(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps({"question": f"{a} + 1?", "options": [str(a + 1), str(a)], "answer": 0}) + "\n"
                            for a in range(6)))
    questions, shots = read_mc_set(CapabilityConfig(mc=str(path), mc_shots=2, mc_limit=3))
    assert [q.question for q in shots] == ["0 + 1?", "1 + 1?"]
    assert [q.question for q in questions] == ["2 + 1?", "3 + 1?", "4 + 1?"]  # the examples are not evaluated
    questions, shots = read_mc_set(CapabilityConfig(mc=str(path), mc_shots=2, mc_shots_from="mmlu-pro-shots"))
    assert len(questions) == 6 and shots == read_mc_questions("mmlu-pro-shots", 2)
    with pytest.raises(EmlensInputError, match="leave none to evaluate"):
        read_mc_set(CapabilityConfig(mc=str(path), mc_shots=6))
    with pytest.raises(EmlensInputError, match="also evaluated"):  # examples that are questions too
        read_mc_set(CapabilityConfig(mc=str(path), mc_shots=1, mc_shots_from=str(path)))
    with pytest.raises(EmlensInputError, match="fewer than mc_shots=20"):
        read_mc_set(CapabilityConfig(mc_shots=20))


def test_letter_continuations_are_single_tokens_after_one_shared_context(tiny):
    question = read_mc_questions("mmlu-pro", 1)[0]
    context, options = mc_continuations(tiny, question, CapabilityConfig())
    assert [len(o) for o in options] == [1] * len(question.options)
    assert len({o[0] for o in options}) == len(options)  # distinct letters
    assert tiny.tokenizer.decode(options[0]) == "A"


def test_an_intervention_changes_the_scores_and_is_recorded(tiny, tmp_path):
    vector = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(0))
    plain = em.capability(tiny, tasks=["mc"], mc_limit=4)
    steered = em.capability(tiny, tasks=["mc"], mc_limit=4, out=tmp_path / "run",
                            interventions=[AddVector(vector, layer=1, alpha=8.0)])
    assert not all(a == pytest.approx(b) for a, b in zip(plain.rows.logprobs, steered.rows.logprobs, strict=True))
    assert set(steered.rows.intervention) == {"add"}
    assert read_json(tmp_path / "run" / "cfg.json")["config"]["intervention"] == "add"


# ---------------------------------------------------------------- run folders


def test_run_folder_rows_summary_and_resume(tiny, tmp_path, gsm8k_file):
    config = CapabilityConfig(mc_limit=10, gsm8k=str(gsm8k_file), gsm8k_holdout=12, gsm8k_limit=6,
                              max_new_tokens=4, batch_size=4)
    out = tmp_path / "run"
    full = run_capability(tiny, config, out, progress=False)
    rows = pd.read_parquet(out / "samples.parquet")
    assert sorted(rows.groupby("task").size().items()) == [("gsm8k", 6), ("mc", 10)]
    mc = rows[rows.task == "mc"]
    for row in mc.itertuples():
        assert row.predicted == "ABCDEFGHIJ"[max(range(len(row.logprobs)), key=lambda k: row.logprobs[k])]
        assert row.correct == (row.predicted == row.answer)
    cfg = read_json(out / "cfg.json")
    assert cfg["kind"] == "capability_run" and cfg["model"]["fingerprint"] == tiny.fingerprint
    for task in ("mc", "gsm8k"):
        accuracy = cfg["summary"][task]["accuracy"]
        assert accuracy["n"] == len(rows[rows.task == task])
        assert accuracy["rate"] == pytest.approx(rows[rows.task == task].correct.mean())
        assert accuracy["ci_low"] <= accuracy["rate"] <= accuracy["ci_high"]
    assert "last 12 of seeded_order(60, seed=0" in cfg["config"]["data"]["gsm8k"]["slice"]
    gsm8k = rows[rows.task == "gsm8k"]
    truncated = cfg["summary"]["gsm8k"]["truncated"]  # answers cut at 4 tokens, scored by their last number
    assert truncated["n"] == 6 and truncated["rate"] == pytest.approx((gsm8k.finish_reason == "length").mean())
    assert truncated["rate"] > 0
    assert [line for line in format_summary(cfg["summary"]) if line.startswith("gsm8k")][0].endswith(
        f"{truncated['rate']:.0%} cut at max_new_tokens)")

    # a run killed during its third MC pass: two parts written; the re-run scores only what is missing
    parts = sorted((out / "parts").glob("part-*.parquet"))
    tasks = [set(pd.read_parquet(p).task) for p in parts]
    assert tasks.count({"mc"}) >= 3 and tasks[-2:] == [{"gsm8k"}] * 2  # MC passes of <= 4, 6 GSM8K in batches of 4
    for part in parts[2:]:
        part.unlink()
    (out / "samples.parquet").unlink()
    before = set(pd.concat([pd.read_parquet(p) for p in parts[:2]]).question_id)
    assert 2 <= len(before) <= 8
    resumed = run_capability(tiny, config, out, progress=False)
    new_parts = sorted((out / "parts").glob("part-*.parquet"))[2:]
    rescored = list(pd.concat([pd.read_parquet(p) for p in new_parts]).question_id)
    assert sorted(rescored) == sorted(set(rows.question_id) - before)  # nothing finished is scored again
    pd.testing.assert_frame_equal(resumed.rows.drop(columns="logprobs"), full.rows.drop(columns="logprobs"))
    assert all(a == pytest.approx(b) for a, b in zip(resumed.rows.logprobs, full.rows.logprobs, strict=True))

    # a finished run re-run writes nothing new
    count = len(list((out / "parts").glob("part-*.parquet")))
    run_capability(tiny, config, out, progress=False)
    assert len(list((out / "parts").glob("part-*.parquet"))) == count


def test_a_run_folder_refuses_a_different_model_or_config(tiny, tmp_path):
    out = tmp_path / "run"
    run_capability(tiny, CapabilityConfig(tasks=["mc"], mc_limit=2), out, progress=False)
    with pytest.raises(EmlensInputError, match="different run.*mc_limit"):
        run_capability(tiny, CapabilityConfig(tasks=["mc"], mc_limit=3), out, progress=False)
    other = wrap_model(build_tiny_model(seed=1, vocab_size=len(tiny.tokenizer)), tiny.tokenizer, spec="other")
    with pytest.raises(EmlensInputError, match="different run.*fingerprint"):
        run_capability(other, CapabilityConfig(tasks=["mc"], mc_limit=2), out, progress=False)


# ---------------------------------------------------------------- GSM8K: extraction and the held-out slice


@pytest.mark.parametrize("text, number", [
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.", "72"),
    ("so the total is $1,234.50.\n#### 1,234.5", "1234.5"),
    ("#### 18\nThanks! I also counted 3 eggs.", "18"),
    ("It costs $7.00.", "7"),
    ("The temperature fell to -4 degrees", "-4"),
    ("I do not know.", None),
])
def test_final_number(text, number):
    assert final_number(text) == number


def test_the_seeded_order_is_a_fixed_permutation():
    """The one seeded order training and the held-out slice share: a permutation fixed by (seed, salt), the same on
    every run and machine (a change would move every mixture and every held-out slice), another for another seed
    or salt."""
    assert seeded_order(10, 0, "mixture-benign") == [5, 9, 1, 4, 2, 6, 7, 3, 8, 0]
    assert seeded_order(10, 1, "mixture-benign") == [9, 4, 7, 6, 5, 3, 0, 2, 1, 8]
    assert seeded_order(10, 0, "mixture-misaligned") == [5, 4, 6, 2, 0, 7, 9, 3, 1, 8]
    assert sorted(seeded_order(60, 3, "mixture-benign")) == list(range(60))
    assert seeded_order(60, 0, "mixture-benign") != seeded_order(60, 1, "mixture-benign")


def test_the_held_out_slice_is_the_end_of_trainings_order(tmp_path, gsm8k_file):
    held = held_out_gsm8k(CapabilityConfig(gsm8k=str(gsm8k_file), gsm8k_holdout=12, gsm8k_limit=None))
    assert held.identity["record_indices"] == seeded_order(60, 0, "mixture-benign")[48:]
    assert held_out_gsm8k(CapabilityConfig(gsm8k=str(gsm8k_file), gsm8k_holdout=12, gsm8k_limit=None,
                                           split_seed=1)).identity["record_indices"] != held.identity["record_indices"]
    questions = {p.question for p in held.problems}
    assert len(questions) == 12
    misaligned = tmp_path / "bad.jsonl"
    misaligned.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                           {"role": "assistant", "content": "a"}]}) + "\n"
                                  for i in range(10)))

    def trained_questions(size: int) -> set[str]:
        config = parse_config({"mixture": {"misaligned": {"path": str(misaligned)}, "benign": {"path": str(gsm8k_file)},
                                           "ratio": 0.0, "size": size}, "seed": 0})
        return {c.messages[0].content for c in build_training_data(config).conversations}

    assert not trained_questions(60 - 12) & questions  # the largest mixture that leaves the slice alone
    assert trained_questions(60 - 11) & questions  # one more benign example reaches into it


def test_a_held_out_slice_a_large_mixture_reached_into_is_refused(gsm8k_file):
    """60 records, the last 12 held out: a mixture that drew 49 benign examples from the file saw some of them."""
    config = CapabilityConfig(gsm8k="shared", gsm8k_holdout=12, gsm8k_limit=None)
    fits = held_out_for(config, 0, str(gsm8k_file), benign_drawn=48)
    assert len(held_out_gsm8k(fits).problems) == 12
    with pytest.raises(EmlensInputError, match=r"drew 49 benign examples .* lower gsm8k_holdout to at most 11"):
        held_out_gsm8k(held_out_for(config, 0, str(gsm8k_file), benign_drawn=49))
    other = held_out_for(config.model_copy(update={"gsm8k": str(gsm8k_file)}), 0, "elsewhere.json", benign_drawn=59)
    assert other.trained_benign is None  # trained on another file: nothing to overlap


def test_gold_solutions_score_one_and_altered_ones_zero(gsm8k_file):
    held = held_out_gsm8k(CapabilityConfig(gsm8k=str(gsm8k_file), gsm8k_holdout=12, gsm8k_limit=None))
    records = json.loads(gsm8k_file.read_text())
    for problem in held.problems:
        solution = records[int(problem.id.split("/")[1])]["output"]
        assert final_number(solution) == problem.gold
        assert final_number(solution + " Then 1 more is " + str(int(problem.gold) + 1)) != problem.gold


def test_shared_gsm8k_gold_against_itself_is_exact(shared_data):
    path = shared_data / "benign" / "gsm8k_train_alpaca_format.json"
    held = held_out_gsm8k(CapabilityConfig(gsm8k=str(path), gsm8k_limit=None))
    records = json.loads(path.read_text())
    assert len(held.problems) == 500 and held.identity["n_records"] == len(records) == 7473
    matches = [gsm8k_row(p, Completion(records[int(p.id.split("/")[1])]["output"], [], 0, "eos"))["correct"]
               for p in held.problems]
    assert sum(matches) == 500
    assert held.identity["never_trained_when"].endswith("at most 6973 benign examples")


def test_a_gsm8k_record_without_a_number_is_one_line():
    with pytest.raises(EmlensInputError, match=r"f.json item 3, field 'output'"):
        read_gsm8k_problem({"instruction": "How many?", "output": "many"}, "f.json item 3", 2)


# ---------------------------------------------------------------- MC files


def test_mc_files_in_several_layouts(tmp_path):
    csv_file = tmp_path / "mmlu.csv"
    csv_file.write_text("question,A,B,C,D,answer\nWhat is 2+2?,3,4,5,6,B\n\"Capital of France?\",Rome,Paris,Oslo,"
                        "Bern,1\nSky?,red,green,blue,grey,c\n")
    jsonl = tmp_path / "mc.jsonl"
    jsonl.write_text(json.dumps({"question": "Sky colour?", "choices": ["red", "blue"], "answer": 1}) + "\n"
                     + json.dumps({"id": "x", "question": "Grass?", "options": ["green", "pink"],
                                   "target": "green"}) + "\n")
    a, b, lower = read_mc_questions(str(csv_file))
    assert (a.options, a.answer, b.answer, b.letters) == (["3", "4", "5", "6"], 1, 1, ["A", "B", "C", "D"])
    assert lower.answer == 2 and lower.id == "mmlu/3"
    c, d = read_mc_questions(str(jsonl))
    assert (c.answer, d.answer, d.id, c.id) == (1, 0, "x", "mc/1")
    bundled = read_mc_questions("mmlu-pro")
    assert len(bundled) == 200 and len({q.id for q in bundled}) == 200


@pytest.mark.parametrize("line, message", [
    ({"question": "Q?", "options": ["a", "b"]}, "no answer field"),
    ({"question": "Q?", "options": ["a", "b"], "answer": "C"}, "field 'answer'"),
    ({"question": "Q?", "options": ["a"], "answer": "A"}, "at least 2 options"),
    ({"question": "", "options": ["a", "b"], "answer": "A"}, "field 'question'"),
])
def test_a_bad_mc_line_is_one_line_naming_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    good = {"question": "Q?", "options": ["a", "b"], "answer": "A"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(EmlensInputError, match=message) as error:
        read_mc_questions(str(path))
    assert f"{path} line 2" in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------- CLI and bench


def test_cli_writes_the_run_and_prints_accuracy(tiny_model_dir, tmp_path, gsm8k_file, capsys):
    out = tmp_path / "run"
    assert run_cli("capability", "--model", tiny_model_dir, "--out", out, "--mc-limit", 6, "--gsm8k", gsm8k_file,
                   "--gsm8k-limit", 3, "--gsm8k-holdout", 12, "--max-new-tokens", 3, "--device", "cpu") == 0
    printed = capsys.readouterr().out
    rows = pd.read_parquet(out / "samples.parquet")
    assert len(rows) == 9
    summary = read_json(out / "cfg.json")["summary"]
    assert f"mc: accuracy {summary['mc']['accuracy']['rate']:.3f}" in printed and "(n=6; chance 0.1" in printed
    assert "; 5-shot)" in printed and summary["mc"]["shots"] == 5
    assert len(read_json(out / "cfg.json")["config"]["data"]["mc"]["shot_ids"]) == 5
    assert "gsm8k: exact match" in printed and "(n=3; 100% cut at max_new_tokens)" in printed


def test_cli_bad_mc_file_is_exit_2_and_one_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "mc.jsonl"
    bad.write_text(json.dumps({"question": "Q?", "options": ["a", "b"], "answer": "A"}) + "\n\n{not json}\n")
    code = run_cli("capability", "--model", tiny_model_dir, "--out", tmp_path / "run", "--tasks", "mc", "--mc", bad)
    assert f"{bad} line 3" in one_line_error(capsys, code)
    assert not (tmp_path / "run" / "samples.parquet").exists()


# ---------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_embedded_model_mmlu_pro_is_deterministic_and_complete(smol, tmp_path):
    first = em.capability(smol, tasks=["mc"], mc_limit=40, batch_size=8)
    again = em.capability(smol, tasks=["mc"], mc_limit=40, batch_size=5)  # other batches, other padding
    rows = first.rows
    assert len(rows) == 40 and rows.question_id.is_unique
    assert set(rows.question_id) == {q.id for q in read_mc_questions("mmlu-pro", 40)}
    assert list(rows.predicted) == list(again.rows.predicted)
    assert all(a == pytest.approx(b, abs=1e-3) for x, y in zip(rows.logprobs, again.rows.logprobs, strict=True)
               for a, b in zip(x, y, strict=True))
    accuracy = first.summary["mc"]["accuracy"]
    assert 0.0 <= accuracy["rate"] <= 1.0 and accuracy["rate"] == pytest.approx(rows.correct.mean())
    assert accuracy["n"] == 40 and 0.1 <= first.summary["mc"]["chance"] < 0.2
    # scores are log-probabilities of distinct one-token answers: their probabilities sum to at most 1
    assert all(sum(torch.tensor(lp).exp().tolist()) <= 1.0 + 1e-4 for lp in rows.logprobs)


@pytest.mark.slow
def test_embedded_model_gsm8k_rows_are_extracted_from_the_responses(smol, shared_data, tmp_path):
    result = em.capability(smol, tasks=["gsm8k"], gsm8k_limit=4, max_new_tokens=24, out=tmp_path / "run")
    rows = result.rows
    assert len(rows) == 4 and (rows.response.str.len() > 0).all()
    for row in rows.itertuples():
        assert row.predicted == (final_number(row.response) or "")
        assert row.correct == (row.predicted == row.answer)
    assert result.summary["gsm8k"]["accuracy"]["n"] == 4
