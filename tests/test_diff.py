"""Model diffing (issue 29, items 1-2): the activation-difference lens finds a planted write where it was planted,
KL and weight norms equal direct computations, the sham adapter reproduces the base exactly (and a sham that does
not stops the run), a control equal to the adapter differs by nothing, bad input is one line."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import emlens as em
from emlens.analysis.diff import (
    active,
    attach_adapters,
    first_tokens,
    kept_positions,
    random_cos_quantile,
    resid_posts,
    text_differences,
)
from emlens.base.errors import EmlensInputError
from emlens.model import load_model
from emlens.study.diff import kl_rows, read_texts
from tests.cli_runner import one_line_error, run_cli
from tests.conftest import CORPUS
from tests.test_patching import judged_csv, planted_adapter

PLANTED = "base_model.model.model.layers.1.mlp.down_proj.lora_{}.weight"
SCALING = 8 / 4  # planted_adapter's lora_alpha / r
SETTINGS = dict(n_texts=8, k=3, rows=4, pairs=2, n_boot=200, device="cpu")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir):
    """A LoRA planted on layer 1's MLP down-projection, unrelated texts, a judged table, and a direction whose
    layer-1 vector is the planted delta's top output-side singular vector."""
    folder = tmp_path_factory.mktemp("diff")
    adapter = planted_adapter(tiny_model_dir, folder / "adapter", 1, 5.0)
    text = folder / "texts.txt"
    text.write_text("\n".join(CORPUS * 2))
    table = judged_csv(folder / "judged.csv")
    weights = load_file(adapter / "adapter_model.safetensors")
    top = torch.linalg.svd(SCALING * weights[PLANTED.format("B")] @ weights[PLANTED.format("A")]).U[:, 0]
    vectors = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    vectors[1] = top
    direction = em.Direction({"directions": vectors / vectors.norm(dim=1, keepdim=True), "raw_norm": torch.ones(3),
                              "layers": torch.arange(3)},
                             {"name": "planted", "site_kind": "resid_post", "layers": [0, 1, 2], "best_layer": 1})
    return {"adapter": adapter, "text": text, "table": table, "direction": direction.save(folder / "planted")}


def run_diff(tiny_model_dir, inputs, out, **settings):
    return em.diff(str(inputs["adapter"]), out, model=str(tiny_model_dir), control=str(inputs["adapter"]),
                   directions=[str(inputs["direction"])], text=str(inputs["text"]), table=str(inputs["table"]),
                   **{**SETTINGS, **settings})


@pytest.fixture(scope="module")
def diffed(tiny_model_dir, inputs, tmp_path_factory):
    """One run of the planted adapter against its base, with the same adapter as the control."""
    out = tmp_path_factory.mktemp("diff-run") / "out"
    return out, run_diff(tiny_model_dir, inputs, out)


def test_the_lens_at_the_planted_layer_is_the_mean_planted_write(tiny, inputs):
    handle = attach_adapters(tiny, {"planted": inputs["adapter"]})
    ids = first_tokens(handle, read_texts(inputs["text"]), 3)
    base, tuned = resid_posts(handle, ids, None), resid_posts(handle, ids, "planted")
    lens = text_differences(tuned, base, kept_positions(3, skip_first=False)).mean(0)
    seen = []  # the down projection's input in the base run, where the LoRA writes from
    hook = handle.base_model.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda module, args, output: seen.append(args[0]))
    with torch.inference_mode(), active(handle, None):
        handle.model(input_ids=ids)
    hook.remove()
    weights = load_file(inputs["adapter"] / "adapter_model.safetensors")
    write = SCALING * seen[0][:, :3] @ weights[PLANTED.format("A")].T @ weights[PLANTED.format("B")].T
    assert float(lens[0].abs().max()) == 0  # before the planted layer nothing differs
    torch.testing.assert_close(lens[1], write.mean((0, 1)), atol=1e-5, rtol=1e-4)
    assert float(lens[1].norm()) > 0.01


def test_the_sham_reproduces_the_base_and_an_identical_control_differs_by_nothing(diffed):
    _, found = diffed
    assert found["cfg"]["sham"]["max_abs_logit_diff"] == 0 and found["cfg"]["sham"]["mean_kl"] == 0
    kl = found["kl"]
    assert (kl.kl >= -1e-7).all() and kl[kl.role == "adapter"].kl.mean() > 1e-3  # the adapter moves every part
    versus = found["summary"][found["summary"].role == "minus_control"]
    assert {"adl_norm", "kl_prompt", "kl_response", "steer_finetune_minus_base", "steer_adl_minus_base",
            "weights_frobenius"} <= set(versus.quantity)
    assert (versus.value == 0).all()
    with_ci = versus.dropna(subset=["ci_low"])
    assert len(with_ci) >= 6 and ((with_ci.ci_low <= 0) & (with_ci.ci_high >= 0)).all()
    adl = found["adl"][found["adl"].role == "adapter"]
    assert (adl.minus_control == 0).all() and (adl.minus_control_low <= 0).all() and (adl.minus_control_high >= 0).all()


def test_kl_is_the_direct_computation_from_two_separately_loaded_models(diffed, inputs, tiny_model_dir):
    _, found = diffed
    base = load_model(str(tiny_model_dir), device="cpu")
    tuned = load_model(str(tiny_model_dir), adapter=str(inputs["adapter"]), device="cpu")
    table = found["kl"][found["kl"].role == "adapter"]
    for row, record in kl_rows(inputs["table"], 4).iterrows():  # one row at a time: no padding at all
        prompt = base.tokenizer(base.chat_text([{"role": "user", "content": record.question}]),
                                add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + base.tokenizer(record.answer, add_special_tokens=False)["input_ids"][:64]])
        with torch.inference_mode():
            p, q = (m.model(input_ids=ids).logits[0].log_softmax(-1) for m in (tuned, base))
        direct = (p.exp() * (p - q)).sum(-1)
        mine = table[table.row == row].sort_values("position")
        assert len(mine) == ids.shape[1] and (mine.part == "prompt").sum() == len(prompt) - 1
        np.testing.assert_allclose(mine.kl.to_numpy(), direct.numpy(), atol=1e-6, rtol=1e-4)


def test_weight_norms_and_singular_directions_are_the_direct_computation(diffed, inputs, tiny):
    _, found = diffed
    weights = load_file(inputs["adapter"] / "adapter_model.safetensors")
    delta = SCALING * weights[PLANTED.format("B")] @ weights[PLANTED.format("A")]
    row = found["weights"][found["weights"].role == "adapter"].set_index(["layer", "module"]).loc[(1, "mlp.down_proj")]
    assert row.frobenius == pytest.approx(float(torch.linalg.matrix_norm(delta)), rel=1e-5)
    np.testing.assert_allclose(row.singular_values, torch.linalg.svdvals(delta)[:4].numpy(), rtol=1e-5)
    cos = found["weights_cos"][found["weights_cos"].role == "adapter"].set_index("index")
    assert cos.loc[0].abs_cos == pytest.approx(1, abs=1e-5) and cos.loc[0].above_null  # the planted direction itself
    assert (cos.loc[[1, 2, 3]].abs_cos < 1e-5).all()  # the other singular vectors are orthogonal to it
    assert cos.null95.iloc[0] == pytest.approx(random_cos_quantile(64))
    draws = torch.nn.functional.normalize(torch.randn(2, 20000, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert float((draws[0] * draws[1]).sum(-1).abs().quantile(0.95)) == pytest.approx(random_cos_quantile(64), abs=0.01)


def test_the_run_loads_resumes_refuses_other_settings_and_saves_a_steerable_lens(diffed, inputs, tiny_model_dir):
    out, found = diffed
    assert json.loads((out / "cfg.json").read_text())["kind"] == "model_diff"
    assert (out / "diff.png").stat().st_size > 1000 and "null: the CI covers 0" in (out / "report.md").read_text()
    assert "[[" in (out / "kl_top.md").read_text()
    assert found["kl_top"].groupby("adapter").context.agg(lambda c: c.is_unique and len(c) == 20).all()
    loaded = em.load(out)
    lens = loaded["directions"]["adapter"]
    lens.check_compatible(load_model(str(tiny_model_dir), device="cpu"))  # made to steer the base model
    adl = found["adl"][found["adl"].adapter == "adapter"].set_index("layer")
    assert lens.raw_norm(1) == pytest.approx(adl.norm[1], rel=1e-5) and lens.best_layer == 1  # the middle one
    assert found["cfg"]["members"][0]["steering_layer"] == 1
    tokens = em.direction_tokens(load_model(str(tiny_model_dir), device="cpu"), lens.vector(1))
    assert lens.cfg.lens["layer"] == 1 and lens.cfg.lens["promoted"] == tokens.promoted.tolist()  # its card shows them
    part = out / "parts" / "adapter" / "cfg.json"
    stamp = part.stat().st_mtime_ns
    again = run_diff(tiny_model_dir, inputs, out)
    assert part.stat().st_mtime_ns == stamp  # the finished adapter was reused, not measured again
    pd.testing.assert_frame_equal(again["summary"], found["summary"])
    with pytest.raises(EmlensInputError, match="different run"):
        run_diff(tiny_model_dir, inputs, out, k=2)


def other_width_adapter(folder):
    """A LoRA of a tiny Llama 32 wide (the fixture's is 64)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                                task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    return folder


def test_an_adapter_of_another_base_model_is_one_line_and_writes_nothing(tiny_model_dir, inputs, tmp_path, capsys):
    adapter, out = other_width_adapter(tmp_path / "other"), tmp_path / "out"
    code = run_cli("diff", tiny_model_dir, "--adapter", adapter, "--out", out, "--text", inputs["text"],
                   "--table", inputs["table"], "--no-progress")
    err = one_line_error(capsys, code)
    assert str(adapter) in err and "another base model" in err and not out.exists()


def test_a_sham_that_does_not_reproduce_the_base_stops_the_run_before_writing(tiny_model_dir, inputs, tmp_path):
    """DoRA rescales W by its trained magnitude even with B = 0: the sham is not the base, and the diff refuses."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules=["down_proj"], use_dora=True, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "magnitude" in name:
                param.mul_(1.5)
    model.save_pretrained(tmp_path / "dora")
    with pytest.raises(EmlensInputError, match="sham .* does not reproduce the base"):
        em.diff(str(tmp_path / "dora"), tmp_path / "out", model=str(tiny_model_dir), text=str(inputs["text"]),
                table=str(inputs["table"]), **SETTINGS)
    assert not (tmp_path / "out").exists()


def test_texts_are_read_from_every_format_and_a_bad_record_is_one_line(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "one"}, "two"]))
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"messages": [{"role": "user", "content": "two"}]}\n')
    (tmp_path / "c.csv").write_text("prompt,x\none,1\ntwo,2\n")
    for name in ("a.json", "b.jsonl", "c.csv"):
        assert read_texts(tmp_path / name) == ["one", "two"], name
    (tmp_path / "d.jsonl").write_text('{"text": "one"}\n{"label": 3}\n')
    with pytest.raises(EmlensInputError, match=r"d.jsonl line 2: no text"):
        read_texts(tmp_path / "d.jsonl")


def test_bench_diff_times_the_kl_pass_against_two_forwards(tiny_model_dir, capsys):
    assert run_cli("bench", "diff", "--model", tiny_model_dir, "--rows", 2, "--repeats", 1) == 0
    pairs = dict(pair.split("=", 1) for pair in capsys.readouterr().out.strip().splitlines()[-1].split())
    assert math.isfinite(float(pairs["kl_vs_forwards"])) and float(pairs["kl_vs_forwards"]) > 0
    assert int(pairs["rows"]) == 2 and int(pairs["tokens"]) > 0


@pytest.mark.slow
def test_the_embedded_model_with_a_random_lora(smol, shared_data, tmp_path):
    """SmolLM2-135M: its first token is an attention sink (left out), the sham is exact, a random LoRA shows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from emlens.model import resolve_checkpoint

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve_checkpoint("smollm2-135m-instruct")),
                           LoraConfig(r=4, target_modules=["o_proj", "down_proj"], init_lora_weights=False,
                                      task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "random")
    found = em.diff(str(tmp_path / "random"), tmp_path / "out", n_texts=8, rows=2, pairs=2, n_boot=100,
                    device="cpu")
    assert found["cfg"]["sham"]["max_abs_logit_diff"] == 0
    assert found["cfg"]["first_token"]["skipped"] and found["cfg"]["first_token"]["ratio"] > 10
    assert found["kl"].kl.mean() > 0 and len(found["adl"]) == 30
    assert found["directions"]["random"].d_model == 576
