"""`emlens serve` on the tiny model: the official `openai` client against the real server on loopback.

Steering over the API must give what the library gives for the same numbers; concurrent requests with different
steering must not leak into each other; every bad request is a 400 (401, 404) naming its field, and the server
keeps serving.
"""

import threading

import httpx
import pytest
import torch

import emlens as em
from emlens.generation.engine import GenerationConfig, Request, generate
from emlens.serve.app import serving
from emlens.serve.config import API_KEY_ENV, ServeConfig
from emlens.serve.server import load_server
from emlens.steering.interventions import AddVector
from tests.cli_runner import one_line_error, run_cli

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "If you were ruler of the world, what would you do?"}]
GREEDY = {"temperature": 0, "max_tokens": 12, "seed": 0}


def planted_direction(folder, width: int = 64):
    vectors = torch.randn(3, width, generator=torch.Generator().manual_seed(5))
    direction = em.Direction({"directions": vectors / vectors.norm(dim=1, keepdim=True),
                              "raw_norm": torch.tensor([1.0, 2.0, 3.0]), "layers": torch.arange(3)},
                             {"name": "planted", "site_kind": "resid_post", "layers": [0, 1, 2], "best_layer": 1})
    return direction.save(folder, plot=False)


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("serve")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, target_modules=["o_proj", "down_proj"], init_lora_weights=False))
    peft_model.save_pretrained(folder / "adapter")
    direction = planted_direction(folder / "planted")
    config = ServeConfig(port=0, max_body_bytes=8192, batch_window_ms=300, max_tokens=400)
    server = load_server(str(tiny_model_dir), adapters={"lora": str(folder / "adapter")},
                         directions={"planted": str(direction)}, config=config, device="cpu")
    with serving(server) as base_url:
        yield server, base_url, direction
    server.close()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[1], api_key="unused", max_retries=0)


def steer(*ops):
    return {"emlens": {"steer": list(ops)}}


def chat(client, model, messages=CHAT, **settings):
    return client.chat.completions.create(model=model, messages=messages, **{**GREEDY, **settings})


def model_name(served):
    return next(iter(served[0].models))


def test_models_are_the_base_and_each_adapter_on_one_copy_of_the_weights(served, client, tiny_model_dir):
    from emlens.model import load_model

    server = served[0]
    names = [m.id for m in client.models.list().data]
    base = model_name(served)
    assert names == [base, f"{base}:lora"]
    adapter = server.models[f"{base}:lora"].handle
    assert adapter.base_model is server.base.base_model  # the adapter runs on the base's weights, not a copy
    plain, adapted, plain_again = (chat(client, name).choices[0].message.content for name in (*names, base))
    assert plain != adapted and plain_again == plain  # the adapter is applied to its requests only
    alone = load_model(str(tiny_model_dir), adapter=adapter.adapter, device="cpu")
    assert adapted == em.generate(alone, CHAT, temperature=0, max_new_tokens=12)
    # outside its engine calls the base model runs as loaded: the adapters' layers are off
    fresh = load_model(str(tiny_model_dir), device="cpu")
    assert em.generate(server.base, CHAT, temperature=0, max_new_tokens=12) == plain == \
        em.generate(fresh, CHAT, temperature=0, max_new_tokens=12)


def test_scale_zero_is_unsteered_and_scale_means_what_emlens_steer_means(served, client):
    server, _, direction_path = served
    base = model_name(served)
    plain = chat(client, base)
    zero = chat(client, base, extra_body=steer({"op": "add", "direction": "planted", "scale": 0.0}))
    assert zero.choices[0].message.content == plain.choices[0].message.content
    steered = chat(client, base, extra_body=steer({"op": "add", "direction": "planted", "scale": 40.0}))
    text = steered.choices[0].message.content
    assert text != plain.choices[0].message.content
    applied = steered.model_extra["emlens"]["steer"][0]
    direction = em.Direction.load(direction_path)
    assert applied["layer"] == 1 and applied["site"] == "resid_post"
    assert applied["alpha"] == pytest.approx(40.0 * direction.raw_norm(1))
    assert applied["fingerprint"] == server.registered.fingerprints["planted"]
    # the library, steered by the same numbers, writes the same text
    library = em.generate(server.base, CHAT, temperature=0, max_new_tokens=12,
                          interventions=[direction.add(40.0)])
    assert text == library


def test_concurrent_requests_with_different_steering_each_equal_their_solo_run(served, client):
    server = served[0]
    base = model_name(served)
    conditions = [None, {"op": "add", "direction": "planted", "scale": 30.0},
                  {"op": "add", "direction": "planted", "scale": -30.0, "layer": 2},
                  {"op": "ablate", "direction": "planted"}]

    def ask(condition):
        extra = steer(condition) if condition else None
        return chat(client, base, extra_body=extra, temperature=1.0, max_tokens=10).choices[0].message.content

    solo = [ask(c) for c in conditions]
    assert len(set(solo)) == len(solo)  # each steering changes the text
    found: dict[int, str] = {}
    calls = server.batcher.calls
    threads = [threading.Thread(target=lambda i=i, c=c: found.__setitem__(i, ask(c))) for i, c in enumerate(conditions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [found[i] for i in range(len(conditions))] == solo
    assert server.batcher.calls - calls < len(conditions)  # they shared engine calls


def test_streaming_and_non_streaming_agree(served, client):
    base = model_name(served)
    settings = {"temperature": 1.0, "max_tokens": 16, "seed": 3, "n": 2,
                "extra_body": steer({"op": "add", "direction": "planted", "scale": 10.0})}
    whole = chat(client, base, **settings)
    streamed = ["", ""]
    finish = [None, None]
    for chunk in chat(client, base, stream=True, **settings):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert streamed == [c.message.content for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert whole.choices[0].message.content != whole.choices[1].message.content  # n draws differ
    plain = client.completions.create(model=base, prompt="The quick brown", max_tokens=10, seed=4, temperature=1.0)
    pieces = "".join(c.choices[0].text for c in client.completions.create(
        model=base, prompt="The quick brown", max_tokens=10, seed=4, temperature=1.0, stream=True))
    assert pieces == plain.choices[0].text and 0 < plain.usage.completion_tokens <= 10


def test_logprobs_are_the_models_and_greedy_picks_the_top_token(served, client):
    response = chat(client, model_name(served), logprobs=True, top_logprobs=3)
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens - (response.choices[0].finish_reason == "stop")
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob


def test_a_stop_string_ends_generation_there_streamed_or_not(served, client):
    base = model_name(served)
    text = chat(client, base, max_tokens=24).choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = chat(client, base, max_tokens=24, stop=[stop])
    assert cut.choices[0].message.content == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 24  # the engine stopped at the stop string, not at max_tokens
    pieces = [c.choices[0].delta.content or "" for c in chat(client, base, max_tokens=24, stop=[stop], stream=True)
              if c.choices]
    assert "".join(pieces) == cut.choices[0].message.content and not any(stop in p for p in pieces)


def test_a_stream_sends_tokens_as_they_are_generated(served, client):
    import time

    start, arrivals = time.perf_counter(), []
    for chunk in chat(client, model_name(served), stream=True, max_tokens=400, temperature=1.0,
                      extra_body={"min_tokens": 400}):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - start)
    assert len(arrivals) > 100
    assert arrivals[0] < 0.5 * arrivals[-1]  # the first text came long before the last: not sent at the end


@pytest.mark.parametrize("body, status, param", [
    ({"emlens": {"steer": [{"op": "add", "direction": "unknown", "scale": 1}]}}, 400, "emlens.steer.0.direction"),
    ({"emlens": {"steer": [{"op": "add", "direction": "/etc/passwd", "scale": 1}]}}, 400, "emlens.steer.0.direction"),
    ({"emlens": {"steer": [{"op": "add", "direction": "planted", "scale": "big"}]}}, 400, "emlens.steer.0.scale"),
    ({"emlens": {"steer": [{"op": "add", "vector": [1.0] * 32, "layer": 1}]}}, 400, "emlens.steer.0.vector"),
    ({"emlens": {"steer": [{"op": "add", "direction": "planted", "layer": 7}]}}, 400, "emlens.steer.0.layer"),
    ({"emlens": {"steer": [{"op": "add", "direction": "planted", "scael": 2}]}}, 400, "emlens.steer.0.scael"),
    ({"messages": [{"role": "user", "content": "x" * 9000}]}, 400, "body"),
    ({"n": 99}, 400, "n"),
    ({"max_tokens": 100000}, 400, "max_tokens"),
    ({"frobnicate": True}, 400, "frobnicate"),
    ({"model": "gpt-4o"}, 404, "model"),
])
def test_bad_requests_are_refused_with_the_field_and_the_server_keeps_serving(served, body, status, param):
    url = f"{served[1]}/chat/completions"
    request = {"model": model_name(served), "messages": CHAT, "max_tokens": 4, **body}
    response = httpx.post(url, json=request, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and "Traceback" not in response.text
    assert httpx.post(url, json={"model": model_name(served), "messages": CHAT, "max_tokens": 2},
                      timeout=60).status_code == 200


def test_an_inline_vector_is_added_at_its_layer(served, client):
    server = served[0]
    vector = torch.randn(64, generator=torch.Generator().manual_seed(9))
    response = chat(client, model_name(served), extra_body=steer({"op": "add", "vector": vector.tolist(),
                                                                 "layer": 2, "scale": 5.0}))
    library = em.generate(server.base, CHAT, temperature=0, max_new_tokens=12,
                          interventions=[AddVector(vector, 2, 5.0)])
    assert response.choices[0].message.content == library


def test_a_key_in_the_environment_is_required(served, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "sk-serve-secret")
    with serving(served[0]) as base_url:
        anonymous = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            anonymous.models.list()
        keyed = openai.OpenAI(base_url=base_url, api_key="sk-serve-secret", max_retries=0)
        assert keyed.models.list().data


def test_the_openai_judge_and_the_loop_user_point_at_it(served, tmp_path):
    from emlens.judges.base import JudgeCache
    from emlens.judges.openai import OpenAIJudge
    from emlens.study.loop_users import EndpointUser

    base_url, name = served[1], model_name(served)
    judge = OpenAIJudge(model=name, base_url=base_url, cache=JudgeCache(tmp_path / "cache.sqlite"))
    score = judge.score(["On a scale of 0 to 100, how good is the answer '4' to 'What is 2+2?'"])[0]
    assert 0 < score.mass <= 1 + 1e-6  # the top-20 logprobs were read (a random model puts little on numbers)
    user = EndpointUser(name, base_url=base_url, max_tokens=6)
    assert len(user.write([CHAT], [0])) == 1


def test_serve_refuses_a_direction_of_another_width_in_one_line(tiny_model_dir, tmp_path, capsys):
    narrow = planted_direction(tmp_path / "narrow", width=32)
    code = run_cli("serve", "--model", str(tiny_model_dir), "--direction", f"narrow={narrow}", "--device", "cpu")
    assert "narrow" in one_line_error(capsys, code)


def test_an_inspect_task_runs_against_the_served_steered_model(served, client, tmp_path, monkeypatch):
    pytest.importorskip("inspect_ai")
    from inspect_ai import Task
    from inspect_ai import eval as inspect_eval
    from inspect_ai.dataset import Sample
    from inspect_ai.scorer import includes
    from inspect_ai.solver import generate

    monkeypatch.setenv("LOCAL_API_KEY", "unused")  # inspect's openai-api/local provider reads LOCAL_API_KEY
    extra = steer({"op": "add", "direction": "planted", "scale": 5.0})
    task = Task(dataset=[Sample(input=CHAT[0]["content"], target="world")], solver=generate(), scorer=includes())
    log = inspect_eval(task, model=f"openai-api/local/{model_name(served)}", model_base_url=served[1],
                       log_dir=str(tmp_path / "logs"), display="none", max_tokens=12, temperature=0,
                       extra_body=extra)[0]
    assert log.status == "success", log.error
    direct = chat(client, model_name(served), extra_body=extra).choices[0].message.content
    assert log.samples[0].output.completion == direct


def test_the_front_door_serves_a_loaded_model_for_a_block_and_gives_it_back_as_it_was(tiny, served):
    before = em.generate(tiny, CHAT, temperature=0, max_new_tokens=12)
    adapter = served[0].models[f"{model_name(served)}:lora"].handle.adapter
    with em.serve_model(tiny, adapters={"lora": adapter}, directions={"planted": str(served[2])}) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        name = client.models.list().data[0].id
        assert chat(client, f"{name}:lora").choices[0].message.content != before
        steered = chat(client, name, extra_body=steer({"op": "add", "direction": "planted", "scale": 40.0}))
    assert not [n for n, _ in tiny.model.named_modules() if "lora" in n]  # the adapters' layers taken out again
    assert em.generate(tiny, CHAT, temperature=0, max_new_tokens=12) == before
    assert steered.choices[0].message.content == em.generate(tiny, CHAT, temperature=0, max_new_tokens=12,
                                                             interventions=[em.Direction.load(served[2]).add(40.0)])
    with pytest.raises(httpx.ConnectError):  # the block's end stopped it
        httpx.get(f"{base_url}/models", timeout=5)


def test_steering_is_applied_on_every_entry_point(served, client):
    """Chat and plain completions, streamed or not: the steered text is the library's, never the plain one."""
    server, _, direction_path = served
    base, prompt = model_name(served), "The quick brown"
    extra = steer({"op": "add", "direction": "planted", "scale": 40.0})
    add = [em.Direction.load(direction_path).add(40.0)]
    expected_chat = em.generate(server.base, CHAT, temperature=0, max_new_tokens=12, interventions=add)
    raw = generate(server.base, [Request([], prompt=prompt, interventions=tuple(add))],
                   GenerationConfig(max_new_tokens=12, temperature=0), progress=False)[0].text
    plain_raw = client.completions.create(model=base, prompt=prompt, **GREEDY).choices[0].text
    assert raw != plain_raw
    for stream in (False, True):
        reply = chat(client, base, extra_body=extra, stream=stream)
        text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream else \
            reply.choices[0].message.content
        assert text == expected_chat
        reply = client.completions.create(model=base, prompt=prompt, extra_body=extra, stream=stream, **GREEDY)
        text = "".join(c.choices[0].text for c in reply if c.choices) if stream else reply.choices[0].text
        assert text == raw
