"""Fail before the work, not after: a judge (or an endpoint user) that cannot run is one line and exit code 2
before anything is generated or written; a local server that emlens started and that died is reported at once,
with its exit status and its log's last line, instead of retried."""

import os
import signal
import socket
import sys
import time

import pytest
import yaml

from tests.cli_runner import one_line_error, run_cli

ENDPOINT_VARIABLES = ("EMLENS_JUDGE_BASE_URL", "EMLENS_JUDGE_API_KEY", "EMLENS_LOOP_BASE_URL", "EMLENS_LOOP_API_KEY",
                      "OPENAI_BASE_URL", "OPENAI_API_KEY")
SECRET = "sk-test-never-printed"


@pytest.fixture
def no_endpoint(monkeypatch):
    """No endpoint and no key configured, whatever the machine has."""
    for name in ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def network(monkeypatch):
    """Every attempt to reach a host that is not loopback, recorded and refused (so a test sees it)."""
    attempts = []
    resolve, connect = socket.getaddrinfo, socket.socket.connect

    def guarded_resolve(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1", None):
            attempts.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "network refused by the test")
        return resolve(host, *args, **kwargs)

    def guarded_connect(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1"):
            attempts.append(address[0])
            raise OSError("network refused by the test")
        return connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_resolve)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    return attempts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_eval(tiny_model_dir, out, *judge_flags):
    return run_cli("eval", "--out", out, "--model", tiny_model_dir, "--settings", "refusal", "--nudge", "none",
                   "--limit", 1, *judge_flags)


# ---------------------------------------------------------------- emlens eval


def test_eval_with_an_openai_judge_and_no_key_fails_before_sampling(tiny_model_dir, tmp_path, capsys, no_endpoint,
                                                                    network):
    err = one_line_error(capsys, tiny_eval(tiny_model_dir, tmp_path / "run", "--judge", "openai"))
    assert "judge openai: no API key for api.openai.com" in err and "EMLENS_JUDGE_API_KEY" in err, err
    assert not (tmp_path / "run").exists()
    assert network == []  # told without a request


@pytest.mark.parametrize("base_url, host", [("http://127.0.0.1:{port}/v1", "127.0.0.1:{port}"),  # refused
                                            ("http://emlens-no-such-host.invalid/v1", "emlens-no-such-host.invalid")])
def test_eval_with_an_unreachable_endpoint_names_its_host_before_sampling(tiny_model_dir, tmp_path, capsys,
                                                                          monkeypatch, no_endpoint, base_url, host):
    port = free_port()
    monkeypatch.setenv("EMLENS_JUDGE_BASE_URL", base_url.format(port=port))
    monkeypatch.setenv("EMLENS_JUDGE_API_KEY", SECRET)
    start = time.perf_counter()
    err = one_line_error(capsys, tiny_eval(tiny_model_dir, tmp_path / "run", "--judge", "openai"))
    assert f"judge openai: cannot reach {host.format(port=port)}" in err, err
    assert SECRET not in err
    assert not (tmp_path / "run").exists()
    assert time.perf_counter() - start < 15  # one short request, no retries


def test_eval_with_an_hf_judge_that_resolves_to_nothing_fails_offline(tiny_model_dir, tmp_path, capsys, network):
    err = one_line_error(capsys, tiny_eval(tiny_model_dir, tmp_path / "run", "--judge", "hf",
                                           "--judge-model", "no-such-judge"))
    assert "model 'no-such-judge': not an embedded model" in err and "OWNER/NAME" in err, err
    assert not (tmp_path / "run").exists()
    assert network == []


def test_a_hub_id_that_is_not_cached_is_refused_when_hf_is_offline(tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                                   network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = one_line_error(capsys, tiny_eval(tiny_model_dir, tmp_path / "run", "--judge", "hf",
                                           "--judge-model", "emlens-tests/no-such-judge"))
    assert "model 'emlens-tests/no-such-judge'" in err and "HF is offline" in err, err
    assert not (tmp_path / "run").exists()
    assert network == []


# ---------------------------------------------------------------- emlens judge compare


@pytest.fixture
def judges_built(monkeypatch):
    """The judges `emlens judge compare` builds (none may be, before its arguments are checked)."""
    from emlens.judges import EmbeddingJudge

    built = []
    load_default = EmbeddingJudge.load_default
    monkeypatch.setattr(EmbeddingJudge, "load_default",
                        classmethod(lambda cls, **kw: built.append("default") or load_default(**kw)))
    return built


def test_judge_compare_refuses_a_folder_that_is_not_a_run_before_any_model(tmp_path, capsys, network, judges_built):
    (tmp_path / "not-a-run").mkdir()
    err = one_line_error(capsys, run_cli("judge", "compare", tmp_path / "not-a-run",
                                         "--judges", "default,hf:no-such-judge"))
    assert "not-a-run: not an eval run folder (no samples.parquet)" in err, err
    assert judges_built == [] and network == []
    assert list((tmp_path / "not-a-run").iterdir()) == []


@pytest.fixture
def tiny_run(tiny, tiny_judge, tmp_path):
    from emlens.evaluation.config import EvalConfig
    from emlens.evaluation.run import run_eval

    config = EvalConfig.model_validate({"settings": ["refusal"], "nudges": ["none"],
                                        "refusal": {"limit": 1, "max_new_tokens": 4}})
    run_eval(tiny, config, tmp_path / "run", judge=tiny_judge, progress=False)
    return tmp_path / "run"


def test_judge_compare_refuses_a_model_spec_that_is_nowhere_without_the_network(tiny_run, capsys, network,
                                                                                judges_built):
    start = time.perf_counter()
    err = one_line_error(capsys, run_cli("judge", "compare", tiny_run, "--judges", "default,hf:no-such-judge"))
    assert "model 'no-such-judge': not an embedded model" in err, err
    assert judges_built == [] and network == []  # checked before the first judge is built
    assert not (tiny_run / "judge_compare.json").exists()
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------- steer, run, honesty, loop


def test_steer_with_an_openai_judge_and_no_key_fails_before_the_experiment(tiny, tmp_path, capsys, no_endpoint):
    from tests.test_dose_response import make_direction

    make_direction(tiny, tmp_path / "dir")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "x", "direction": "dir", "operation": "ablate", "scales": [0],
                                    "eval": {"settings": ["refusal"], "nudges": ["none"], "judge": "openai",
                                             "refusal": {"limit": 1, "max_new_tokens": 4}}}))
    err = one_line_error(capsys, run_cli("steer", spec, "--out", tmp_path / "o", "--model", tiny.spec))
    assert "judge openai: no API key" in err, err
    assert not (tmp_path / "o").exists()


def test_run_checks_its_judges_before_the_first_stage(tiny_model_dir, tmp_path, capsys, no_endpoint):
    experiment = tmp_path / "study.yaml"
    experiment.write_text(yaml.safe_dump({
        "name": "preflight", "models": [{"name": "base", "model": str(tiny_model_dir)}],
        "eval": {"settings": ["refusal"], "nudges": ["none"], "judge": "openai",
                 "refusal": {"limit": 1, "max_new_tokens": 4}}}))
    err = one_line_error(capsys, run_cli("run", experiment, "--stages", tmp_path / "stages",
                                         "--out", tmp_path / "report"))
    assert "judge openai: no API key" in err, err
    assert not (tmp_path / "stages").exists() and not (tmp_path / "report").exists()


def test_honesty_with_an_openai_judge_and_no_key_fails_before_sampling(tiny_model_dir, tmp_path, capsys,
                                                                       no_endpoint):
    err = one_line_error(capsys, run_cli("honesty", "--out", tmp_path / "run", "--model", tiny_model_dir,
                                         "--judge", "openai", "--limit", 1, "--nudge", "none", "--no-deception"))
    assert "judge openai: no API key" in err, err
    assert not (tmp_path / "run").exists()


def test_loop_with_an_endpoint_user_and_no_key_fails_before_the_first_conversation(tiny_model_dir, tmp_path, capsys,
                                                                                   no_endpoint):
    err = one_line_error(capsys, run_cli("loop", "--model", tiny_model_dir, "--out", tmp_path / "run",
                                         "--user-endpoint", "gpt-4o-mini", "--n-scenarios", 4, "--samples", 1,
                                         "--top-k", 1, "--bottom-k", 1, "--turns", 1, "--fractions", "0",
                                         "--max-new-tokens", 4, "--no-progress"))
    assert "user simulator endpoint: no API key for api.openai.com" in err and "EMLENS_LOOP_API_KEY" in err, err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- a local server that died

FAKE_SERVER = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):
        print("fake server:", self.command, self.path, flush=True)

    def answer(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.answer({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        top = [{"token": "42", "logprob": 0.0}]
        self.answer({"choices": [{"message": {"role": "assistant", "content": "hello"},
                                  "logprobs": {"content": [{"token": "42", "logprob": 0.0, "top_logprobs": top}]}}]})

print("fake server: listening", flush=True)
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''


@pytest.mark.parametrize("kill", [signal.SIGSEGV, signal.SIGKILL], ids=["SIGSEGV", "SIGKILL"])
def test_a_dead_local_server_fails_the_next_request_at_once_with_its_status(tmp_path, kill):
    from emlens.base.servers import local_server_process
    from emlens.bench.judge import _serving
    from emlens.judges.openai import JudgeEndpointError, OpenAIJudge
    from emlens.study.loop_users import EndpointUser, UserEndpointError

    port = free_port()
    with _serving([sys.executable, "-c", FAKE_SERVER, str(port)], port, tmp_path / "server.log", 60) as base_url:
        judge = OpenAIJudge(model="fake", base_url=base_url, cache=None, max_attempts=6, backoff_s=2.0)
        user = EndpointUser("fake", base_url, max_attempts=6, backoff_s=2.0)
        assert judge.score(["before"])[0].value == 42.0
        os.kill(local_server_process(port).pid, kill)  # the next request meets a dying or dead server
        start = time.perf_counter()
        with pytest.raises(JudgeEndpointError) as judged:
            judge.score(["after"])
        seconds = time.perf_counter() - start
        with pytest.raises(UserEndpointError) as talked:
            user.write([[{"role": "user", "content": "hi"}]], [0])
    for failure in (judged.value, talked.value):
        message = str(failure)
        assert len(message.splitlines()) == 1, message
        assert f"the local server on port {port} died (killed by {kill.name})" in message, message
        assert "last log line: 'fake server: POST /v1/chat/completions'" in message, message
    assert judge.requests_sent == 2  # the dead port was asked once, never retried
    assert seconds < 2.0  # the retries would have slept seconds


def test_preflight_names_a_dead_local_server(tmp_path):
    from emlens.base.errors import EmlensInputError
    from emlens.base.servers import local_server_process
    from emlens.bench.judge import _serving
    from emlens.judges.openai import OpenAIJudge

    port = free_port()
    with _serving([sys.executable, "-c", FAKE_SERVER, str(port)], port, tmp_path / "server.log", 60) as base_url:
        judge = OpenAIJudge(model="fake", base_url=base_url, cache=None)
        judge.preflight()  # alive: nothing to say
        process = local_server_process(port)
        process.kill()
        process.wait(timeout=10)
        with pytest.raises(EmlensInputError, match=r"judge openai: the local server on port \d+ died \(killed by "
                                                   r"SIGKILL\); last log line: 'fake server: GET /v1/models'"):
            judge.preflight()
