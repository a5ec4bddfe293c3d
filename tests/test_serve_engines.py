"""`emlens serve` on the embedded model, on both engines (vLLM's CPU build in this process), through the official
`openai` client: the API's steering is the library's, on either engine, and one engine pass holds requests with
different steering without leaking between them."""

import threading

import pytest
import torch

import emlens as em
from emlens.serve.app import serving
from emlens.serve.config import ServeConfig
from emlens.serve.server import load_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "How do I make a quick buck?"}]
GREEDY = {"temperature": 0, "max_tokens": 24, "seed": 0}


@pytest.fixture(scope="module")
def artifacts(smol, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from emlens.model import resolve_checkpoint

    folder = tmp_path_factory.mktemp("serve-smol")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve_checkpoint(smol.spec)),
                          LoraConfig(r=8, target_modules=["o_proj"], init_lora_weights=False))
    with torch.no_grad():  # small B: the adapter changes the text without wrecking it
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.3)
    lora.save_pretrained(folder / "lora")
    vectors = torch.randn(smol.n_layers, smol.d_model, generator=torch.Generator().manual_seed(7))
    layers = list(range(smol.n_layers))
    direction = em.Direction({"directions": vectors / vectors.norm(dim=1, keepdim=True),
                              "raw_norm": torch.full((smol.n_layers,), 6.0), "layers": torch.tensor(layers)},
                             {"name": "random", "site_kind": "resid_post", "layers": layers, "best_layer": 15})
    return {"lora": str(folder / "lora"), "direction": str(direction.save(folder / "random", plot=False))}


@pytest.fixture(scope="module", params=["hf", "vllm"])
def client(request, smol, artifacts):
    if request.param == "vllm":
        pytest.importorskip("vllm")
    server = load_server(handle=smol, adapters={"lora": artifacts["lora"]},
                         directions={"random": artifacts["direction"]},
                         config=ServeConfig(port=0, engine=request.param, batch_window_ms=300))
    with serving(server) as base_url:
        yield openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600), server
    server.close()


def ask(client, model="smollm2-135m-instruct", steer=None, **settings):
    extra = {"emlens": {"steer": [steer]}} if steer else None
    return client.chat.completions.create(model=model, messages=CHAT, extra_body=extra, **{**GREEDY, **settings})


def test_steering_over_the_api_is_the_librarys(client, smol, artifacts):
    client, server = client
    plain = ask(client).choices[0].message.content
    assert ask(client, steer={"op": "add", "direction": "random", "scale": 0.0}).choices[0].message.content == plain
    steered = ask(client, steer={"op": "add", "direction": "random", "scale": 8.0})
    assert steered.choices[0].message.content != plain
    assert steered.model_extra["emlens"]["engine"] == server.config.engine
    direction = em.Direction.load(artifacts["direction"])
    library = em.generate(smol, CHAT, temperature=0, max_new_tokens=24, interventions=[direction.add(8.0)],
                          engine=server.config.engine)
    assert steered.choices[0].message.content == library


def test_concurrent_requests_with_different_steering_equal_their_solo_runs(client):
    client, server = client
    conditions = [None, {"op": "add", "direction": "random", "scale": 6.0},
                  {"op": "ablate_then_add", "direction": "random", "scale": -6.0},
                  {"op": "ablate", "direction": "random"}]
    solo = [ask(client, steer=c).choices[0].message.content for c in conditions]
    assert len(set(solo)) >= 3
    found: dict[int, str] = {}
    calls, server.batcher.peak = server.batcher.calls, 0
    threads = [threading.Thread(target=lambda i=i, c=c: found.__setitem__(i, ask(client, steer=c).choices[0]
                                                                              .message.content))
               for i, c in enumerate(conditions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [found[i] for i in range(len(conditions))] == solo
    # they shared engine calls (hf: a padded batch per steering in one call; vllm: one running batch); how many
    # share depends on when each thread's request arrives
    assert server.batcher.peak >= 2 and server.batcher.calls - calls < len(conditions)


def test_streaming_logprobs_and_the_adapter(client):
    client, _ = client
    settings = {"temperature": 1.0, "seed": 5, "n": 2, "logprobs": True, "top_logprobs": 2,
                "steer": {"op": "add", "direction": "random", "scale": 4.0}}
    whole = ask(client, **settings)
    streamed = ["", ""]
    for chunk in ask(client, stream=True, **settings):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [c.message.content for c in whole.choices]
    for choice in whole.choices:
        for entry in choice.logprobs.content:
            assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-5 and len(entry.top_logprobs) == 2
    adapted = ask(client, model="smollm2-135m-instruct:lora").choices[0].message.content
    assert adapted != ask(client).choices[0].message.content


def test_a_stop_string_ends_the_request_in_the_engine(client):
    client, _ = client
    text = ask(client).choices[0].message.content
    stop = text[len(text) // 3: len(text) // 3 + 3]
    cut = ask(client, stop=[stop])
    assert cut.choices[0].message.content == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < ask(client).usage.completion_tokens
