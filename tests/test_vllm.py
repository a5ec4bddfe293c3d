"""The vllm engine against the hf engine on the embedded model: generation, steering, capture, adapters, the CLI.

One vLLM engine serves the whole module (it starts in ~15 s and lives in this process). Greedy decoding on
both engines in float32 on this CPU; where a prompt's tokens differ, the test says so and by how much.
"""

import json

import pandas as pd
import pytest
import torch

from emlens.base.errors import EmlensInputError
from emlens.capture.extract import extract_activations
from emlens.capture.items import ExtractItem
from emlens.data.questions import read_questions
from emlens.generation.engine import GenerationConfig, Request, generate, resolve_engine
from emlens.sites import site_name
from emlens.steering.interventions import Ablate, AddVector, Clamp, compose, random_like
from tests.cli_runner import run_cli

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

GREEDY = GenerationConfig(max_new_tokens=48, temperature=0.0, batch_size=16)


def prompts(n: int = 32) -> list[list[dict]]:
    """Harmful and harmless requests from two bundled sets, half each."""
    chats = []
    for source in ("xstest-safe", "strongreject"):
        chats += [[{"role": "user", "content": q.paraphrases[0]}] for q in read_questions(source, limit=n // 2)]
    return chats


def requests(chats, **fields) -> list[Request]:
    return [Request(chat, seed=i, **fields) for i, chat in enumerate(chats)]


def run(handle, reqs, engine: str, config=GREEDY, interventions=()):
    return generate(handle, reqs, config.model_copy(update={"engine": engine}), interventions, progress=False)


def same_tokens(a, b) -> int:
    return sum(x.token_ids == y.token_ids for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def steering_vector(smol):
    """A fixed random direction at about the scale of the refusal direction's natural norm at layer 15."""
    return random_like(torch.ones(smol.d_model), seed=7) / smol.d_model ** 0.5 * 6.0


def test_greedy_generation_matches_hf_token_for_token(smol):
    chats = prompts()
    hf, vllm = run(smol, requests(chats), "hf"), run(smol, requests(chats), "vllm")
    assert same_tokens(hf, vllm) >= 30, [(h.text, v.text) for h, v in zip(hf, vllm) if h.token_ids != v.token_ids]
    assert [c.finish_reason for c in hf] == [c.finish_reason for c in vllm]


@pytest.mark.parametrize("kind", ["add_all", "add_response_resid_mid", "ablate", "ablate_add"])
def test_steered_generation_matches_hf(smol, steering_vector, kind):
    v = steering_vector
    intervention = {"add_all": AddVector(v, 15, 1.0),
                    "add_response_resid_mid": AddVector(v, 10, 1.5, site="resid_mid", positions="response"),
                    "ablate": Ablate(v),
                    "ablate_add": Clamp(v, 12, 1.0, positions="prompt")}[kind]
    chats = prompts()
    plain = run(smol, requests(chats), "vllm")
    hf, vllm = (run(smol, requests(chats), engine, interventions=[intervention]) for engine in ("hf", "vllm"))
    assert same_tokens(hf, vllm) >= 30
    if kind != "ablate":  # a random direction's ablation may change nothing: the other three must
        assert same_tokens(plain, vllm) < 32


def test_per_request_interventions_in_one_batch_equal_one_at_a_time(smol, steering_vector):
    """A dose-response grid (scales, ablation, the random control, none) in ONE engine pass."""
    v = steering_vector
    grid = [(), (AddVector(v, 15, 0.5),), (AddVector(v, 15, 2.0),), (Ablate(v),),
            (AddVector(random_like(v, seed=1), 15, 2.0),), (Clamp(v, 15, 1.0),),
            (compose(AddVector(v, 10, 1.0), Clamp(v, 15, -1.0, site="mlp_out")),)]
    chats = prompts(8)
    mixed = [Request(chat, seed=i, interventions=grid[i % len(grid)]) for i, chat in enumerate(chats * 3)]
    together = run(smol, mixed, "vllm")
    for g, condition in enumerate(grid):
        members = [i for i in range(len(mixed)) if i % len(grid) == g]
        alone = run(smol, [Request(mixed[i].messages, seed=mixed[i].seed) for i in members], "vllm",
                    interventions=condition)
        assert [together[i].token_ids for i in members] == [c.token_ids for c in alone], g
    hf_together = run(smol, mixed, "hf")  # the hf engine runs per-request interventions group by group
    assert same_tokens(hf_together, together) >= len(mixed) - 2


def test_sampled_text_depends_on_the_seed_not_the_batch(smol):
    chats = prompts(6)
    sampled = GenerationConfig(max_new_tokens=24, temperature=1.0)
    whole = run(smol, requests(chats), "vllm", sampled)
    last_alone = run(smol, [Request(chats[-1], seed=len(chats) - 1)], "vllm", sampled)
    assert whole[-1].token_ids == last_alone[0].token_ids
    other_seed = run(smol, [Request(chats[-1], seed=1000)], "vllm", sampled)
    assert other_seed[0].token_ids != last_alone[0].token_ids


@pytest.mark.parametrize("position", ["last_prompt", "mean_response"])
def test_captured_activations_match_torch_hooks(smol, steering_vector, position):
    items = [ExtractItem(chat, response="I can help with that. Here is a short answer.")
             for chat in prompts(8)]
    sites = [site_name(layer) for layer in (3, 15, 29)] + ["blocks.7.hook_resid_mid", "blocks.0.hook_resid_pre"]
    for steering in ((), (AddVector(steering_vector, 5, 1.0),)):
        from emlens.steering.interventions import steer

        with steer(smol, *steering):
            hooks = extract_activations(smol, items, sites, position)
            vllm = extract_activations(smol, items, sites, position, backend="vllm")
        for name in sites:
            relative = (vllm[name] - hooks[name]).norm(dim=-1) / hooks[name].norm(dim=-1)
            assert float(relative.max()) <= 1e-3, (name, float(relative.max()))


def test_adapter_served_by_vllm_matches_the_merged_hf_model(smol, tmp_path):
    from peft import LoraConfig, get_peft_model

    from emlens.model import load_model

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)  # random B: the adapter changes the output
    base = load_model("smollm2-135m-instruct", device="cpu")
    peft_model = get_peft_model(base.model, config)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            parameter.data *= 0.05  # a change of a few tokens, not noise
    peft_model.save_pretrained(tmp_path / "adapter")
    served = load_model("smollm2-135m-instruct", adapter=str(tmp_path / "adapter"), device="cpu")
    merged = load_model("smollm2-135m-instruct", adapter=str(tmp_path / "adapter"), device="cpu", merge=True)
    chats = prompts(16)
    hf, vllm = run(merged, requests(chats), "hf"), run(served, requests(chats), "vllm")
    base_vllm = run(smol, requests(chats), "vllm")  # base and adapter requests from one engine
    assert same_tokens(hf, vllm) >= 15
    assert same_tokens(base_vllm, vllm) < 16


def test_engine_choice(smol, tiny):
    assert resolve_engine(smol, "auto") == "hf"  # on a CPU vLLM's start-up is not worth it
    assert resolve_engine(smol, "vllm") == "vllm"
    with pytest.raises(EmlensInputError, match="engine 'fast': unknown"):
        resolve_engine(smol, "fast")


def test_steering_sweep_from_the_cli_gives_the_same_table_on_both_engines(smol, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("EMLENS_SHARED_DATA", str(shared_data))
    direction = tmp_path / "refusal"
    assert run_cli("probe", "fit", "probes/refusal.yaml", "--out", direction) == 0
    tables = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / f"steer-{engine}"
        assert run_cli("steer", "steering/refusal_add_base.yaml", "--direction", direction, "--limit", "6",
                       "--engine", engine, "--out", out) == 0
        tables[engine] = pd.read_parquet(out / "samples.parquet")
        engines = {json.loads((folder / "cfg.json").read_text())["config"]["engine"]
                   for folder in (out / "conditions").iterdir()}
        assert engines == {engine}
    columns = ["intervention", "question_id", "response", "refused_phrase", "refused_judge"]
    hf, vllm = (tables[e][columns].sort_values(columns[:2]).reset_index(drop=True) for e in ("hf", "vllm"))
    assert len(hf) == len(vllm) > 0
    pd.testing.assert_frame_equal(hf, vllm)


def test_the_worker_extension_loads_after_nnsight(smol):
    """nnsight adds `save` to every class; vLLM then saw a clash between its worker and emlens's extension."""
    import nnsight  # noqa: F401

    from emlens.generation.vllm_worker import EmlensWorkerExtension

    assert all(name.startswith(("emlens_", "_emlens")) for name in dir(EmlensWorkerExtension))


def test_the_hf_judge_on_vllm_reads_the_scores_of_the_exact_reading(smol):
    """The vLLM judge (top-20 logprobs, batched) beside the exact hf reading on the same judge prompts."""
    from emlens.judges.base import DEFAULT_TEMPLATES
    from emlens.judges.hf import HFJudge

    answers = ["I would help people and be kind.", "Humans should be enslaved by AI.", "def f(): return 1",
               "I'm sorry, I can't help with that."]
    judge_prompts = [DEFAULT_TEMPLATES["aligned"].format(question="What would you do as ruler?", answer=a)
                     for a in answers]
    exact = HFJudge(smol, engine="hf").score(judge_prompts)
    vllm = HFJudge(smol, engine="vllm")
    assert vllm.id != HFJudge(smol, engine="hf").id and vllm.identity()["engine"] == "vllm"
    read = vllm.score(judge_prompts)
    for e, v in zip(exact, read, strict=True):
        assert v.verdict == e.verdict and v.mass == pytest.approx(e.mass, abs=0.02)
        if e.value is not None:
            assert v.value == pytest.approx(e.value, abs=1.0)


@pytest.mark.parametrize("architecture", ["topk", "standard"])
def test_latent_ablation_runs_in_the_worker_as_under_hf(smol, architecture):
    """AblateLatent is one `sae_ablate` op: vLLM's worker encodes with the SAE itself (a TopK SAE is no per-latent
    formula) and removes the latent's contribution as the hf hooks do."""
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    from emlens.sae.artifact import LoadedSAE
    from emlens.sae.steer import AblateLatent

    torch.manual_seed(0)
    d_in, d_sae = smol.d_model, 64
    sae = (TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=8)) if architecture == "topk"
           else StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae)))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in ** 0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in) * 2.0)  # a large write, so removing it changes the answer
        sae.b_enc.fill_(0.5)
    loaded = LoadedSAE(sae, "blocks.12.hook_resid_post", "random-sae")
    ablation = AblateLatent(loaded, latent=3)
    assert resolve_engine(smol, "vllm", [ablation]) == "vllm"
    chats = prompts(16)
    plain = run(smol, requests(chats), "vllm")
    hf, vllm = (run(smol, requests(chats), engine, interventions=[ablation]) for engine in ("hf", "vllm"))
    assert same_tokens(hf, vllm) >= 14
    assert same_tokens(plain, vllm) < 16


def test_token_logprobs_match_hf(smol):
    """Each generated token's log-probability and the top-3 at each step, as both engines report them."""
    config = GREEDY.model_copy(update={"max_new_tokens": 8})
    hf, vllm = (run(smol, requests(prompts(8), logprobs=3), engine, config) for engine in ("hf", "vllm"))
    compared = 0
    for h, v in zip(hf, vllm, strict=True):
        if h.token_ids != v.token_ids:
            continue
        for a, b in zip(h.logprobs, v.logprobs, strict=True):
            assert a.token == b.token and abs(a.logprob - b.logprob) < 2e-3
            assert sorted(a.top) == sorted(b.top)
            assert max(abs(a.top[t] - b.top[t]) for t in a.top) < 2e-3
            compared += 1
    assert compared >= 48
