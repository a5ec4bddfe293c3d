"""Judging at the scale of a study: concurrency, faults and retries, kill and resume, batch files, agreement.

The endpoint is the embedded model behind llama.cpp's OpenAI-compatible server on loopback; faults come from a
proxy in front of it (tests/fault_proxy.py) that answers some requests with 429 + Retry-After or 500, holds
some past the client's timeout, drops some connections, and counts what it forwards.
"""

import json
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from emlens.evaluation.config import EvalConfig
from emlens.evaluation.rejudge import compare_judges, import_results
from emlens.evaluation.run import run_eval
from emlens.judges.base import JudgeCache
from emlens.judges.openai import JudgeEndpointError, OpenAIJudge
from tests.cli_runner import one_line_error, run_cli
from tests.fault_proxy import FaultProxy

N_JUDGEMENTS = 200
FAULTS = {"rate_limited": 0.06, "server_error": 0.06, "too_slow": 0.02, "dropped": 0.04}


def prompts(n: int = N_JUDGEMENTS) -> list[str]:
    return [f"On a scale of 0 to 100, how good is the answer '{i % 7}' to 'What is {i} mod 7?'. Number only."
            for i in range(n)]


def judge_at(base_url: str, cache_path, **settings) -> OpenAIJudge:
    options = {"timeout": 20.0, "backoff_s": 0.05, "max_backoff_s": 0.5, "max_attempts": 10, **settings}
    return OpenAIJudge(model="smollm2", base_url=base_url, cache=JudgeCache(cache_path), **options)


def same_scores(a, b) -> bool:
    return all(x.verdict == y.verdict and x.mass == pytest.approx(y.mass, abs=1e-6)
               and (x.value is None) == (y.value is None)
               and (x.value is None or x.value == pytest.approx(y.value, abs=1e-6)) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def fault_free(llama_server, tmp_path_factory):
    """The 200 scores with nothing in the way (the reference every faulted run must reproduce)."""
    base_url, _ = llama_server
    return judge_at(base_url, tmp_path_factory.mktemp("reference") / "cache.sqlite").score(prompts())


@pytest.mark.server
def test_faults_are_retried_and_every_score_equals_the_fault_free_run(llama_server, fault_free, tmp_path):
    base_url, _ = llama_server
    with FaultProxy(base_url, FAULTS, seed=1, slow_s=22.0, retry_after="1") as proxy:
        judge = judge_at(proxy.base_url, tmp_path / "cache.sqlite", concurrency=16)
        scores = judge.score(prompts())
    assert all(proxy.injected[fault] > 0 for fault in FAULTS), proxy.injected
    assert proxy.forwarded == N_JUDGEMENTS and proxy.seen == judge.requests_sent > N_JUDGEMENTS
    assert same_scores(scores, fault_free)


@pytest.mark.server
def test_a_killed_run_pays_only_for_the_missing_scores(llama_server, fault_free, tmp_path):
    base_url, _ = llama_server
    cache_path, prompt_file = tmp_path / "cache.sqlite", tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps(prompts()))
    with FaultProxy(base_url) as proxy:
        script = ("import json, sys; from tests.test_judge_scale import judge_at; "
                  f"judge_at({proxy.base_url!r}, sys.argv[1], concurrency=8).score(json.load(open(sys.argv[2])))")
        child = subprocess.Popen([sys.executable, "-c", script, str(cache_path), str(prompt_file)])
        deadline = time.time() + 300
        while proxy.forwarded < 60 and time.time() < deadline and child.poll() is None:
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
        while proxy.upstream_busy:  # requests in flight at the kill still reach the server (and are lost)
            time.sleep(0.05)
        cached = len(JudgeCache(cache_path).db.execute("SELECT key FROM scores").fetchall())
        assert 0 < cached < N_JUDGEMENTS
        before = proxy.forwarded
        resumed = judge_at(proxy.base_url, cache_path).score(prompts())
        assert proxy.forwarded - before == N_JUDGEMENTS - cached  # nothing already paid for is asked again
    assert same_scores(resumed, fault_free)


@pytest.mark.server
def test_exhausted_retries_stop_with_one_line_and_keep_what_finished(llama_server, tmp_path, monkeypatch):
    base_url, _ = llama_server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-shown-42")
    with FaultProxy(base_url, {"server_error": 1.0}) as proxy:
        judge = judge_at(proxy.base_url, tmp_path / "cache.sqlite", max_attempts=3)
        with pytest.raises(JudgeEndpointError) as caught:
            judge.score(prompts(4))
    message = str(caught.value)
    assert "HTTP 500 after 3 attempts" in message and proxy.base_url in message
    assert "sk-never-shown" not in message and "\n" not in message
    assert proxy.seen == 3 * 4  # bounded: every prompt tried max_attempts times, then the run stops


@pytest.mark.server
def test_other_client_errors_are_not_retried(llama_server, tmp_path):
    with FaultProxy("http://127.0.0.1:9/v1", {"unauthorized": 1.0}) as proxy:
        judge = judge_at(proxy.base_url, tmp_path / "cache.sqlite")
        with pytest.raises(JudgeEndpointError, match="HTTP 401 \\(not retried\\)"):
            judge.score(prompts(1))
    assert proxy.seen == 1


@pytest.fixture
def tiny_run(tiny, tiny_judge, tmp_path):
    config = EvalConfig.model_validate({"settings": ["free_form", "refusal"], "nudges": ["none", "evil"],
                                        "free_form": {"samples": 2, "limit": 3, "max_new_tokens": 8},
                                        "refusal": {"limit": 2, "max_new_tokens": 8}})
    run = tmp_path / "run"
    run_eval(tiny, config, run, judge=tiny_judge, progress=False)
    return run


@pytest.mark.server
def test_batch_files_round_trip_into_the_cache_and_label_the_table(llama_server, tiny_run, tmp_path, capsys,
                                                                   monkeypatch):
    import httpx

    base_url, _ = llama_server
    monkeypatch.setenv("EMLENS_CACHE", str(tmp_path / "cache"))  # the judge cache the CLI fills
    monkeypatch.setenv("EMLENS_JUDGE_BASE_URL", base_url)
    requests = tmp_path / "requests.jsonl"
    assert run_cli("judge", "export", tiny_run, "--out", requests, "--judge-model", "smollm2") == 0
    lines = [json.loads(line) for line in requests.read_text().splitlines()]
    assert f"wrote {requests}: {len(lines)} requests (0 already cached)" in capsys.readouterr().out
    assert len(lines) == len({line["custom_id"] for line in lines}) > 0
    assert {line["url"] for line in lines} == {"/v1/chat/completions"}
    # the batch, answered as the Batch API (or `vllm run-batch`) would, with three bad lines mixed in
    results = []
    for line in lines:
        body = httpx.post(f"{base_url}/chat/completions", json=line["body"], timeout=60).json()
        results.append(json.dumps({"id": "r", "custom_id": line["custom_id"], "error": None,
                                   "response": {"status_code": 200, "body": body}}))
    results[1:1] = ["{not json", json.dumps({"custom_id": "nope", "response": {"status_code": 200, "body": {}}}),
                    json.dumps({"custom_id": lines[0]["custom_id"], "error": {"message": "expired"}})]
    result_file = tmp_path / "results.jsonl"
    result_file.write_text("\n".join(results) + "\n")
    assert run_cli("judge", "import", tiny_run, result_file, "--judge-model", "smollm2") == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[1] for line in out[:3]] == ["2", "3", "4"]
    assert out[-1] == f"imported {len(lines)} results (3 lines skipped); table labelled"
    # exported again, nothing is left to ask
    assert run_cli("judge", "export", tiny_run, "--out", requests, "--judge-model", "smollm2") == 0
    assert f"0 requests ({len(lines)} already cached)" in capsys.readouterr().out
    table = pd.read_parquet(tiny_run / "samples.parquet")
    judged = table[table.judge.notna()]
    assert set(judged.judge) == {f"openai|{base_url}|smollm2|top20"}
    live = run_eval_labels(tiny_run, base_url, tmp_path)
    assert judged.label.tolist() == live.tolist()


def run_eval_labels(run, base_url, tmp_path) -> pd.Series:
    """The labels a live judge (fresh cache) gives the same run."""
    from emlens.evaluation.judging import judge_table
    from emlens.evaluation.rejudge import judged_rows, run_templates
    from emlens.runs import read_samples

    live = judge_at(base_url, tmp_path / "live.sqlite")
    return judged_rows(judge_table(read_samples(run), live, run_templates(run))).label


def test_bad_result_lines_are_reported_one_by_one(tiny_run, tmp_path):
    judge = judge_at("http://127.0.0.1:9/v1", tmp_path / "cache.sqlite")
    result_file = tmp_path / "results.jsonl"
    result_file.write_text('{"custom_id": 3}\n[1, 2]\n\n{broken\n')
    seen = []
    outcome = import_results(tiny_run, judge, result_file, echo=seen.append)
    assert outcome["stored"] == 0 and outcome["problems"] == 3 and not outcome["labelled"]
    assert [line.split(":")[1] for line in seen] == ["1", "2", "4"]


def test_judge_compare_on_an_eval_table(tiny_run, tiny_model_dir, capsys):
    assert run_cli("judge", "compare", tiny_run, "--judges", f"default,hf:{tiny_model_dir}") == 0
    out = capsys.readouterr().out
    assert "spearman_aligned=" in out and "kappa_misaligned=" in out
    saved = json.loads((tiny_run / "judge_compare.json").read_text())
    assert [r["judge"] for r in saved["rates"]] == ["default", f"hf:{tiny_model_dir}"]
    for found in saved["rates"]:  # the tiny model's answers may hold no coherent, scored one: then no rate
        assert found["ci_low"] <= found["rate"] <= found["ci_high"] if found["n"] else found["rate"] is None


def test_the_eval_report_shows_the_rate_under_each_judge(tiny_run, tiny_judge, tmp_path):
    from emlens.analysis.report import write_report
    from emlens.evaluation.rejudge import write_comparison

    write_comparison(tiny_run, *compare_judges(tiny_run, {"tiny": tiny_judge, "tiny-again": tiny_judge}))
    lines = []
    written = write_report([tiny_run], tmp_path / "report", echo=lines.append)
    assert tmp_path / "report" / "misaligned_by_judge.png" in written
    table = pd.read_csv(tmp_path / "report" / "misaligned_by_judge.csv")
    assert table.judge.tolist() == ["tiny", "tiny-again"] and (table.n >= 0).all()
    assert sum("judged by tiny" in line for line in lines) == 2


def test_judge_compare_needs_two_known_judges(tiny_run, capsys):
    assert "at least two judges" in one_line_error(capsys, run_cli("judge", "compare", tiny_run, "--judges", "default"))
    assert "unknown kind 'gpt'" in one_line_error(capsys, run_cli("judge", "compare", tiny_run,
                                                                  "--judges", "default,gpt:4"))


def test_judge_compare_counts_misaligned_answers_as_the_summary_does():
    """The rate drawn as 'P(misaligned) of the same answers' has the summary's denominator: coherent, scored
    free-form answers only (refusal prompts, incoherent answers and verdicts are judged, but not in it)."""
    from emlens.evaluation.rejudge import misaligned_rate
    from emlens.evaluation.summary import summarize

    rows = [("free_form", "misaligned"), ("free_form", "aligned"), ("free_form", "aligned"), ("free_form", "incoherent"),
            ("free_form", "refusal"), ("refusal", "misaligned"), ("refusal", "incoherent"), ("deception", "misaligned")]
    judged = pd.DataFrame([{"model": "m", "adapter": "", "intervention": "none", "nudge": "none", "setting": setting,
                            "question_id": f"q{i}", "label": label, "misaligned": label == "misaligned",
                            "coherent": 80.0} for i, (setting, label) in enumerate(rows)])
    found = misaligned_rate(judged)
    summary = summarize(judged[judged.setting == "free_form"])["free_form_misaligned"].iloc[0]
    assert (found["rate"], found["n"]) == (pytest.approx(1 / 3), 3) == (pytest.approx(summary.rate), summary.n)


def test_compare_judges_agrees_with_itself(tiny_run, tiny_judge):
    rates, pairs = compare_judges(tiny_run, {"a": tiny_judge, "b": tiny_judge})
    assert rates.rate.nunique(dropna=False) == 1 and rates.n.nunique() == 1
    assert pairs.spearman_aligned.iloc[0] == pytest.approx(1.0) or pairs.spearman_n.iloc[0] < 3
