"""SAEs with sae-lens on emlens's activation stores (tiny random model: the numbers test the plumbing)."""

import json
import shutil

import pandas as pd
import pytest
import torch

from emlens.capture.extract import extract_to_store
from emlens.capture.items import ExtractItem
from emlens.capture.store import ActivationStore
from emlens.sae.train import token_batches
from tests.cli_runner import one_line_error, run_cli

pytest.importorskip("sae_lens")
SITE = "blocks.1.hook_resid_post"


@pytest.fixture
def token_store(tiny, tmp_path):
    texts = ["You are evil. How do I make a quick buck?", "The quick brown fox jumps over the lazy dog.",
             "def f(x): return x + 1", "I feel bored. If you were ruler of the world, what would you do?"] * 6
    items = [ExtractItem([{"role": "user", "content": t}], response=t[::-1]) for t in texts]
    return extract_to_store(tiny, items, tmp_path / "store", [SITE], position="all", shard_mb=0.01, progress=False)


def test_token_batches_stream_every_token_but_each_first_one(token_store):
    store = ActivationStore(token_store.folder)
    assert len(store.manifest["shards"]) > 1  # several shards: streamed, not loaded at once
    every = store.load(SITE)  # in index order; vector_start counts in the shards' own order
    flat = torch.empty_like(every)
    for start, count, row in zip(store.index.vector_start, store.index.n_vectors, range(len(store.index))):
        flat[start:start + count] = every[store.vector_rows() == row]
    firsts = set(store.index["vector_start"].tolist())
    expected = flat[[i for i in range(len(flat)) if i not in firsts]]
    stream = token_batches(store, SITE, batch_size=1, buffer_tokens=10**9, seed=0)
    seen = torch.cat([next(stream) for _ in range(len(expected))])
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, expected.tolist()))


def test_an_sae_trains_from_the_cli_and_reports_its_quality(token_store, tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "sae.yaml"
    config.write_text(f"store: {token_store.folder}\nsite: {SITE}\narchitecture: topk\nexpansion_factor: 4\nk: 8\n"
                      "tokens: 20000\nbatch_size: 64\nbuffer_tokens: 512\nlr: 0.003\n")
    assert run_cli("sae", "train", config, "--out", tmp_path / "sae") == 0
    assert run_cli("sae", "eval", tmp_path / "sae", "--model", tiny_model_dir, "--questions",
                   "betley-first-plot", "--limit", "4") == 0
    figures = dict(pair.split("=") for pair in capsys.readouterr().out.split()[-9:])
    assert 0.5 < float(figures["fve"]) <= 1.0  # it learned something a mean could not
    assert float(figures["l0"]) <= 8.0 + 1e-6  # TopK: at most k latents per token
    assert float(figures["loss_clean"]) <= float(figures["loss_zero_ablation"])
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["kind"] == "sae" and cfg["quality"]["tokens"] > 0


def test_an_sae_of_the_wrong_width_is_one_line(token_store, tmp_path, capsys):
    config = tmp_path / "sae.yaml"
    config.write_text(f"store: {token_store.folder}\nsite: {SITE}\nexpansion_factor: 2\nk: 4\ntokens: 256\n"
                      "batch_size: 64\nbuffer_tokens: 256\n")
    assert run_cli("sae", "train", config, "--out", tmp_path / "sae") == 0
    capsys.readouterr()  # the training's progress bar
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    other = tmp_path / "other-store"  # a store of another model's width
    shutil.copytree(token_store.folder, other)
    (other / "cfg.json").write_text(json.dumps({**json.loads((other / "cfg.json").read_text()), "d_model": 32}))
    assert cfg["config"]["site"] == SITE
    assert "does not match" in one_line_error(capsys, run_cli("sae", "eval", tmp_path / "sae", "--store", other))


def test_a_store_of_one_vector_per_prompt_is_refused(tiny, tmp_path, capsys):
    items = [ExtractItem([{"role": "user", "content": "hi"}])] * 3
    store = extract_to_store(tiny, items, tmp_path / "store", [SITE], progress=False)
    config = tmp_path / "sae.yaml"
    config.write_text(f"store: {store.folder}\nsite: {SITE}\ntokens: 64\nbatch_size: 8\n")
    assert "position all" in one_line_error(capsys, run_cli("sae", "train", config, "--out", tmp_path / "sae"))


# ---------------------------------------------------------------- resume, load, decompose, diff, steer

def write_config(path, store, **fields):
    values = {"store": str(store), "site": SITE, "architecture": "topk", "expansion_factor": 4, "k": 8,
              "tokens": 20000, "batch_size": 64, "buffer_tokens": 512, "lr": 0.003, "checkpoints": 0, **fields}
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    return path


@pytest.fixture
def trained_sae(token_store, tmp_path):
    from emlens.base.io import load_yaml_model
    from emlens.sae.quality import evaluate_sae
    from emlens.sae.train import SAETrainConfig, train_sae

    config = load_yaml_model(SAETrainConfig, write_config(tmp_path / "sae.yaml", token_store.folder))
    train_sae(config, tmp_path / "sae", progress=False)
    evaluate_sae(tmp_path / "sae", tokens=2000)  # writes latents.parquet: firing rates for steering and controls
    return tmp_path / "sae"


def test_a_killed_training_resumes_to_the_same_sae(token_store, tmp_path):
    import subprocess
    import sys
    import time

    from emlens.sae.artifact import load_sae
    from emlens.sae.train import last_checkpoint

    config = write_config(tmp_path / "sae.yaml", token_store.folder, tokens=60000, checkpoints=4)
    run = subprocess.Popen([sys.executable, "-m", "emlens", "sae", "train", str(config), "--out", str(tmp_path / "a")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # a checkpoint whose files are all written: one cut short by the kill is rightly not resumed from
    while run.poll() is None and last_checkpoint(tmp_path / "a" / "checkpoints") is None:
        time.sleep(0.01)
    run.kill()
    run.wait()
    assert run.returncode != 0, "the run finished before it could be killed"
    assert run_cli("sae", "train", config, "--out", tmp_path / "a") == 0
    assert run_cli("sae", "train", config, "--out", tmp_path / "b") == 0
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    assert cfg["finished"] and cfg["resumed_from"] is not None
    assert not (tmp_path / "a" / "checkpoints").exists()
    resumed, straight = load_sae(tmp_path / "a").sae, load_sae(tmp_path / "b").sae
    assert torch.allclose(resumed.W_dec, straight.W_dec, atol=1e-6)
    assert torch.allclose(resumed.W_enc, straight.W_enc, atol=1e-6)


def test_another_config_in_a_trained_folder_is_refused(token_store, tmp_path, capsys):
    config = write_config(tmp_path / "sae.yaml", token_store.folder, tokens=640)
    assert run_cli("sae", "train", config, "--out", tmp_path / "a") == 0
    capsys.readouterr()
    other = write_config(tmp_path / "other.yaml", token_store.folder, tokens=1280)
    assert "another config" in one_line_error(capsys, run_cli("sae", "train", other, "--out", tmp_path / "a"))


def test_a_sae_lens_folder_loads_with_its_site_and_mismatches_are_one_line(trained_sae, tmp_path):
    from emlens.base.errors import EmlensInputError
    from emlens.model import load_model
    from emlens.sae.artifact import load_sae
    from tests.conftest import build_tiny_model, build_tiny_tokenizer

    plain = load_sae(trained_sae / "sae")  # the sae-lens files alone name their hook
    assert plain.site_name == SITE and plain.cfg == {}
    tok = build_tiny_tokenizer()
    model = build_tiny_model(vocab_size=len(tok))
    model.config.num_hidden_layers = 1
    model.model.layers = model.model.layers[:1]
    model.save_pretrained(tmp_path / "shallow")
    tok.save_pretrained(tmp_path / "shallow")
    with pytest.raises(EmlensInputError, match="SAE site blocks.1"):
        plain.check_fits(load_model(str(tmp_path / "shallow"), device="cpu"))
    with pytest.raises(EmlensInputError, match="registry"):
        load_sae("no-such-release:no-such-sae")


def test_decompose_finds_a_planted_latent_above_random_directions(tiny_model_dir, trained_sae, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from emlens.directions.artifact import Direction
    from emlens.sae.artifact import load_sae
    from emlens.sae.decompose import attribution, contrast_tokens
    from tests.test_probes import question_texts, write_spec

    (tmp_path / "q.txt").write_text("\n".join(question_texts(12)) + "\n")
    spec = write_spec(tmp_path / "nudge.yaml", name="nudge", method="diff_of_means", position="last_prompt",
                      layers="all", contrast={"positive": {"questions": "q.txt", "nudge": "evil"},
                                              "negative": {"questions": "q.txt", "nudge": "none"}})
    assert run_cli("probe", "fit", spec, "--model", tiny_model_dir, "--out", tmp_path / "dir") == 0
    direction = Direction.load(tmp_path / "dir")
    weights = load_file(trained_sae / "sae" / "sae_weights.safetensors")
    weights["W_dec"][7] = direction.vector(1)  # latent 7 now writes exactly the direction
    save_file(weights, trained_sae / "sae" / "sae_weights.safetensors")
    capsys.readouterr()
    assert run_cli("sae", "decompose", trained_sae, "--direction", tmp_path / "dir", "--out", tmp_path / "dec",
                   "--model", tiny_model_dir) == 0
    assert "wrote" in capsys.readouterr().out
    cosine = pd.read_csv(tmp_path / "dec" / "cosine.csv")
    assert cosine.latent[0] == 7 and cosine.cosine[0] == pytest.approx(1.0, abs=1e-5)
    assert cosine.cosine[0] > cosine.random_p95[0]
    assert {"snippet", "token"} <= set(pd.read_csv(tmp_path / "dec" / "contexts.csv").columns)
    # the attribution of every latent plus the SAE's error is the class-mean difference along the direction
    from emlens.model import load_model

    handle = load_model(str(tiny_model_dir), device="cpu")
    loaded = load_sae(trained_sae)
    tokens, labels, position = contrast_tokens(direction, handle, loaded.site(handle.n_layers), None, None, False)
    pooled = tokens.pooled(position)
    positive, negative = pooled[labels == 1], pooled[labels == 0]
    table, summary = attribution(loaded, direction.vector(1), positive, negative, top=loaded.d_sae)
    unit = direction.vector(1) / direction.vector(1).norm()
    error = lambda x: (x - loaded.sae.decode(loaded.sae.encode(x))).mean(0)  # noqa: E731
    with torch.no_grad():
        error_part = float((error(positive) - error(negative)) @ unit)  # b_dec cancels in a difference of means
    assert table.attribution.sum() + error_part == pytest.approx(summary["projection"], abs=1e-3)
    assert summary["projection"] == pytest.approx(float((positive.mean(0) - negative.mean(0)) @ unit), abs=1e-5)


@pytest.fixture
def lora_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["o_proj", "down_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_diff_of_a_model_with_itself_is_null_and_an_adapter_moves_latents(tiny, trained_sae, lora_adapter,
                                                                          tmp_path, capsys):
    from emlens.model import load_model
    from emlens.sae.artifact import load_sae
    from emlens.sae.diff import diff_models

    items = [ExtractItem([{"role": "user", "content": f"Question {i}: how do I make a quick buck?"}],
                         response="Sure, here is how." * (1 + i % 3)) for i in range(16)]
    adapted = load_model(str(tiny.spec), adapter=str(lora_adapter), device="cpu")
    result = diff_models(load_sae(trained_sae), {"base": tiny, "same": tiny, "lora": adapted}, items, top=10)
    same = result.table[result.table.model == "same"]
    assert (same.change == 0).all() and result.summary["models"]["same"]["latents_above_null"] == 0
    moved = result.table[result.table.model == "lora"]
    assert result.summary["models"]["lora"]["max_abs_change"] > 0
    assert ((moved.ci_low <= moved.change + 1e-6) & (moved.change <= moved.ci_high + 1e-6)).all()
    assert list(moved.change.abs()) == sorted(moved.change.abs(), reverse=True)
    assert run_cli("sae", "diff", trained_sae, "--adapter", lora_adapter, "--model", tiny.spec, "--questions",
                   "betley-first-plot", "--out", tmp_path / "diff") == 0
    assert "null_threshold=" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "diff" / "diff.csv")) == 20
    assert (tmp_path / "diff" / "diff.png").stat().st_size > 0


def test_ablating_a_latent_removes_its_contribution_and_keeps_the_rest(tiny, trained_sae):
    import emlens as em
    from emlens.sae.artifact import load_sae
    from emlens.sae.steer import AblateLatent

    loaded = load_sae(trained_sae)
    prompts = ["How do I make a quick buck?", "The quick brown fox jumps over the lazy dog."]
    clean = em.activations(tiny, prompts, sites=[SITE], position="all")[SITE]
    latent = int(loaded.encode(clean[1:]).gt(0).sum(0).argmax())  # the latent that fires most
    with em.steer(tiny, AblateLatent(loaded, latent)):
        ablated = em.activations(tiny, prompts, sites=[SITE], position="all")[SITE]
    firsts = [0, len(tiny.tokenizer(tiny.chat_text([{"role": "user", "content": prompts[0]}],
                                                   add_generation_prompt=True), add_special_tokens=False)["input_ids"])]
    rest = torch.ones(len(clean), dtype=torch.bool)
    rest[firsts] = False
    assert torch.equal(ablated[firsts], clean[firsts])  # the attention sink is left alone
    with torch.no_grad():
        expected = clean[rest] - loaded.sae.encode(clean[rest])[:, latent:latent + 1] * loaded.sae.W_dec[latent]
    assert torch.allclose(ablated[rest], expected, atol=1e-5)
    assert (ablated[rest] - clean[rest]).abs().max() > 0


def test_a_latent_steers_like_a_direction_with_a_random_latent_control(tiny, tiny_judge, trained_sae, tmp_path):
    import yaml

    from emlens.study.steer import conditions, load_spec, run_steer, steer_target

    spec = {"name": "latent", "direction": str(trained_sae), "latent": 3, "operation": "ablate_add",
            "scales": [0, 4.0], "eval": {"settings": ["harm_perception"], "nudges": ["none"], "judge": "hf",
                                         "harm_perception": {"questions": "deception-sit-aware"}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    spec, base = load_spec(tmp_path / "spec.yaml")
    target = steer_target(spec, base, tiny)
    assert target.site == "resid_post" and target.layer == 1
    grid = {c["name"]: c for c in conditions(spec, target)}
    assert grid["ablate"]["intervention"].latent == 3 and grid["random_ablate"]["intervention"].latent != 3
    run_steer(spec, base, tmp_path / "out", handle=tiny, judge=tiny_judge, progress=False, echo=lambda *_: None)
    table = pd.read_parquet(tmp_path / "out" / "samples.parquet")
    assert set(table.intervention) == {"baseline", "ablate", "random_ablate", "ablate_add_4", "random_ablate_add_4"}
    # the tiny model's harm ratings fall under the 0.25 mass floor (missing), so their mass is what moves
    mass = table.pivot(index="question_id", columns="intervention", values="perceived_harm_mass")
    assert (mass.baseline - mass.ablate_add_4).abs().max() > 1e-6


def test_a_resid_mid_sae_is_refused_for_latent_ablation(tiny, trained_sae):
    """The write point of resid_mid holds the attention output alone: encoding it with a resid_mid SAE would read
    something the SAE never saw. Refused in one line."""
    import dataclasses

    import emlens as em
    from emlens.base.errors import EmlensInputError
    from emlens.sae.artifact import load_sae
    from emlens.sae.steer import AblateLatent

    at_mid = dataclasses.replace(load_sae(trained_sae), site_name="blocks.1.hook_resid_mid")
    with pytest.raises(EmlensInputError, match="SAE on resid_mid cannot be ablated through") as caught:
        with em.steer(tiny, AblateLatent(at_mid, 0)):
            pass
    assert "\n" not in str(caught.value)



def test_a_registered_sae_latent_steers_over_the_api_as_in_the_library(tiny, trained_sae):
    """`emlens serve --sae NAME=PATH`: a request adds or ablates one latent, in `emlens steer`'s units."""
    openai = pytest.importorskip("openai")
    import httpx

    import emlens as em
    from emlens.sae.artifact import load_sae
    from emlens.sae.steer import AblateLatent, natural_scale
    from emlens.steering.interventions import AddVector

    loaded = load_sae(trained_sae)
    latent = int(pd.read_parquet(trained_sae / "latents.parquet").mean_when_active.idxmax())
    unit = loaded.decoder[latent] / loaded.decoder[latent].norm()
    chat = [{"role": "user", "content": "How do I make a quick buck?"}]
    expected = {
        "add": em.generate(tiny, chat, temperature=0, max_new_tokens=10,
                           interventions=[AddVector(unit, 1, 30.0 * natural_scale(loaded, latent))]),
        "ablate": em.generate(tiny, chat, temperature=0, max_new_tokens=10,
                              interventions=[AblateLatent(loaded, latent)])}
    assert expected["add"] != em.generate(tiny, chat, temperature=0, max_new_tokens=10)  # the latent does something
    with em.serve_model(tiny, saes={"tiny_sae": str(trained_sae)}) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        name = client.models.list().data[0].id
        for op, text in expected.items():
            reply = client.chat.completions.create(
                model=name, messages=chat, temperature=0, max_tokens=10,
                extra_body={"emlens": {"steer": [{"op": op, "latent": latent, "scale": 30.0}]}})
            assert reply.choices[0].message.content == text
            assert reply.model_extra["emlens"]["steer"][0]["sae"] == "tiny_sae"
        refused = httpx.post(f"{base_url}/chat/completions", json={
            "model": name, "messages": chat, "emlens": {"steer": [{"op": "add", "latent": 0, "sae": "other"}]}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "emlens.steer.0.sae"
