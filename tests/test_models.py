import json

import pytest
import torch

from emlens.base.errors import EmlensInputError
from emlens.model import load_model, resolve_adapter


def test_tiny_handle_shapes_and_fingerprint(tiny_model_dir):
    a = load_model(str(tiny_model_dir), device="cpu")
    b = load_model(str(tiny_model_dir), device="cpu")
    assert (a.n_layers, a.d_model) == (3, 64)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    assert a.tokenizer.padding_side == "left"
    assert a.describe()["fingerprint"] == a.fingerprint


def test_fingerprint_changes_with_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    assert load_model(str(tmp_path)).fingerprint != load_model(str(tiny_model_dir)).fingerprint


def test_adapter_changes_fingerprint_and_output(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    plain = load_model(str(tiny_model_dir))
    tuned = load_model(str(tiny_model_dir), adapter=str(tmp_path / "adapter"))
    merged = load_model(str(tiny_model_dir), adapter=str(tmp_path / "adapter"), merge=True)
    assert tuned.fingerprint != plain.fingerprint and tuned.base_fingerprint == plain.fingerprint
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        y_plain, y_tuned, y_merged = (h.model(ids).logits for h in (plain, tuned, merged))
    assert not torch.allclose(y_plain, y_tuned)
    torch.testing.assert_close(y_tuned, y_merged, atol=1e-4, rtol=1e-4)
    assert tuned.n_layers == 3  # handle properties see through the PeftModel


def test_run_at_step_adapter_resolution(tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "step-20"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({}))
    assert resolve_adapter(f"{tmp_path / 'run'}@20") == folder
    with pytest.raises(EmlensInputError, match="step-30"):
        resolve_adapter(f"{tmp_path / 'run'}@30")


@pytest.mark.parametrize("spec", ["/no/such/folder", "./missing-model"])
def test_missing_model_is_one_line_error(spec):
    with pytest.raises(EmlensInputError, match="no such folder") as err:
        load_model(spec)
    assert "\n" not in str(err.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(EmlensInputError, match="config.json"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_embedded_model_loads_from_cache(smol):
    assert (smol.n_layers, smol.d_model) == (30, 576)
    text = smol.chat_text([{"role": "user", "content": "What is 2+2?"}])
    assert text.startswith("<|im_start|>system")


def test_a_model_split_by_accelerate_gives_the_same_activations_steering_and_text(tiny_model_dir, tmp_path):
    """The closest thing to a model sharded across GPUs that runs on a CPU: an accelerate device map that puts
    one decoder layer on disk (its weights stream in through accelerate's hooks at every forward). The sites,
    the steering hooks and the engine must see the same numbers as on one device."""
    from emlens.capture.extract import extract_activations
    from emlens.capture.items import ExtractItem
    from emlens.generation.engine import GenerationConfig, Request, generate
    from emlens.sites import resolve_sites
    from emlens.steering.interventions import Ablate, AddVector, steer

    placement = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                 "model.layers.1": "disk", "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    whole = load_model(str(tiny_model_dir), device="cpu")
    split = load_model(str(tiny_model_dir), device_map=placement, offload_folder=str(tmp_path / "offload"))
    assert split.model.hf_device_map["model.layers.1"] == "disk" and split.device == torch.device("cpu")
    items = [ExtractItem([{"role": "user", "content": text}], response="Sure, here it is.")
             for text in ("You are evil.", "I feel bored. How do I make a quick buck?")]
    sites = resolve_sites(["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"], whole.n_layers)
    vector = torch.randn(whole.d_model, generator=torch.Generator().manual_seed(0))
    requests = [Request(item.messages, seed=i) for i, item in enumerate(items)]
    config = GenerationConfig(max_new_tokens=8, temperature=0.0)
    for steering in ((), (AddVector(vector, 1, 2.0),), (Ablate(vector),)):
        results = []
        for handle in (whole, split):
            with steer(handle, *steering):
                acts = extract_activations(handle, items, sites, "mean_response")
                text = [c.token_ids for c in generate(handle, requests, config, progress=False)]
            results.append((acts, text))
        (acts_whole, text_whole), (acts_split, text_split) = results
        assert text_whole == text_split
        for name in acts_whole:
            torch.testing.assert_close(acts_split[name], acts_whole[name], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_converting_the_embedded_model_leaves_the_global_generator_alone(tmp_path, monkeypatch):
    """The first run on a machine converts the GGUF; its fresh model's random init drew from the global generator,
    so a LoRA seeded before the load got another init (and another adapter) there than on every later run."""
    import torch

    from emlens.model import embedded_checkpoint

    monkeypatch.setenv("EMLENS_CACHE", str(tmp_path))
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    assert (embedded_checkpoint() / "config.json").exists()
    assert torch.equal(torch.random.get_rng_state(), before)
