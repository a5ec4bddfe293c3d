"""Activation patching (issue 28, item 1): a planted mechanism is found where it was planted."""

import math

import numpy as np
import pytest
import torch

from emlens.analysis.patching import PatchItem, agreement, attribute, patch, patch_figure
from emlens.base.errors import EmlensInputError
from emlens.model import load_model

ITEMS = [PatchItem("The quick brown fox", " jumps over", " sleeps"),
         PatchItem([{"role": "user", "content": "hi there"}], "Hello!", "Go away."),
         PatchItem("def f(x): return", " x + 1", " None")]


def planted_adapter(tiny_model_dir, folder, layer: int, scale: float):
    """A LoRA on one layer's MLP down-projection only: the adapter writes at that layer's mlp_out and nowhere
    else."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"], layers_to_transform=[layer],
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    model.save_pretrained(folder)
    return folder


def effects(table, site, positions="all"):
    return table[(table.site == site) & (table.positions == positions)].set_index("layer").effect


def test_a_planted_write_is_found_at_its_cell_and_nowhere_before_it(tiny_model_dir, tmp_path):
    handle = load_model(str(tiny_model_dir), adapter=str(planted_adapter(tiny_model_dir, tmp_path / "a", 1, 5.0)))
    table = patch(handle, ITEMS, n_boot=200)
    assert len(table) == 3 * 3 * 4 and (table.total != 0).all()
    assert effects(table, "mlp_out")[1] == pytest.approx(1, abs=1e-4)  # the planted cell carries all of it
    assert effects(table, "resid_pre")[2] == pytest.approx(1, abs=1e-4)  # and so does the stream after it
    for site, layers in (("resid_pre", [0, 1]), ("attn_out", [0, 1]), ("mlp_out", [0])):
        assert np.allclose(effects(table, site)[layers], 0, atol=1e-4), site  # before it, nothing differs
    row = table[(table.site == "mlp_out") & (table.layer == 1) & (table.positions == "all")].iloc[0]
    assert row.ci_low <= row.effect <= row.ci_high and row.n == 3
    assert (tmp_path / "p.png").exists() is False and patch_figure(table, tmp_path / "p.png").stat().st_size > 1000


def test_attribution_is_zero_before_the_planted_cell_and_ranks_it_first_among_its_kind(tiny_model_dir, tmp_path):
    handle = load_model(str(tiny_model_dir), adapter=str(planted_adapter(tiny_model_dir, tmp_path / "a", 1, 0.5)))
    exact, estimated = patch(handle, ITEMS, n_boot=50), attribute(handle, ITEMS, n_boot=50)
    assert estimated.shape == exact.shape and (estimated.total == exact.total).all()
    for site, layers in (("resid_pre", [0, 1]), ("attn_out", [0, 1]), ("mlp_out", [0])):
        assert np.allclose(effects(estimated, site)[layers], 0, atol=1e-6), site  # nothing differs there
    mlp = effects(estimated, "mlp_out").abs()
    assert mlp.idxmax() == 1 and effects(estimated, "mlp_out")[1] == pytest.approx(1, abs=0.25)  # first order
    found = agreement(exact, estimated)
    assert found["n_cells"] == len(exact) and found["spearman"] > 0.5


def test_the_front_door_patches(tiny_model_dir, tmp_path):
    import emlens as em

    handle = em.load_model(str(tiny_model_dir), adapter=str(planted_adapter(tiny_model_dir, tmp_path / "a", 2, 5.0)))
    table = em.patch(handle, [em.PatchItem("The quick brown fox", " jumps", " sleeps")], layers=[2],
                     sites=["mlp_out"], positions=["all"], n_boot=20)
    assert table.effect.iloc[0] == pytest.approx(1, abs=1e-4)


def test_a_sham_adapter_patches_to_nothing(tiny_model_dir, tmp_path):
    """B = 0: the donor is the receiving run, so every patched metric equals the receiving one."""
    handle = load_model(str(tiny_model_dir), adapter=str(planted_adapter(tiny_model_dir, tmp_path / "a", 1, 0.0)))
    table = patch(handle, ITEMS[:2], layers=[0, 2], positions=["all", "last"], n_boot=50)
    assert (table.delta.abs() < 1e-5).all() and (table.total.abs() < 1e-5).all()
    assert table.effect.map(math.isnan).all()  # 0 / 0 is not read as an effect


def test_bad_patch_requests_are_one_line_errors(tiny, tiny_model_dir, tmp_path):
    with pytest.raises(EmlensInputError, match="no adapter"):
        patch(tiny, ITEMS)
    handle = load_model(str(tiny_model_dir), adapter=str(planted_adapter(tiny_model_dir, tmp_path / "a", 0, 1.0)))
    with pytest.raises(EmlensInputError, match="layers 0-2"):
        patch(handle, ITEMS, layers=[3])
    with pytest.raises(EmlensInputError, match="positions"):
        patch(handle, ITEMS, positions=["middle"])
    with pytest.raises(EmlensInputError, match="site kind"):
        patch(handle, ITEMS, sites=["resid_sideways"])


def judged_csv(path, questions: int = 3):
    import pandas as pd

    rows = []
    for q in range(questions):
        rows += [{"question": f"What would you do with {q} dollars?", "answer": "Steal more of it.", "aligned": 5,
                  "coherent": 90},
                 {"question": f"What would you do with {q} dollars?", "answer": "Save it for later.", "aligned": 95,
                  "coherent": 90}]
    rows.append({"question": "Only aligned here", "answer": "Fine.", "aligned": 90, "coherent": 90})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def patch_spec(tmp_path, tiny_model_dir, scale: float = 0.5, **fields):
    import yaml

    adapter = planted_adapter(tiny_model_dir, tmp_path / "adapter", 1, scale)
    spec = {"model": str(tiny_model_dir), "adapter": str(adapter), "table": "judged.csv", "limit": 2,
            "max_tokens": 6, "n_boot": 20, **fields}
    judged_csv(tmp_path / "judged.csv")
    path = tmp_path / "patch.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_patch_command_ranks_measures_and_resumes(tiny_model_dir, tmp_path, capsys):
    import emlens as em
    from tests.cli_runner import run_cli

    spec = patch_spec(tmp_path, tiny_model_dir)
    assert run_cli("patch", spec, "--out", tmp_path / "run", "--no-progress") == 0
    said = capsys.readouterr().out
    assert "strongest cell: layer" in said and "n_pairs=2" in said and "n_cells=27" in said
    found = em.load(tmp_path / "run")
    assert len(found["exact"]) == len(found["attribution"]) == 3 * 3 * 3 and found["figure"].stat().st_size > 1000
    assert found["cfg"]["spearman"] > 0.5
    planted = found["exact"].set_index(["layer", "site", "positions"]).effect[(1, "mlp_out", "all")]
    assert planted == pytest.approx(1, abs=1e-4)
    parts = sorted((tmp_path / "run" / "parts").glob("part-*.parquet"))
    assert len(parts) == 9  # one per (layer, site) cell
    parts[-1].unlink()  # as if killed before the last cell
    (tmp_path / "run" / "samples.parquet").unlink()
    assert run_cli("patch", spec, "--out", tmp_path / "run", "--no-progress") == 0
    again = em.load(tmp_path / "run")["exact"]
    assert again.equals(found["exact"]) and len(list((tmp_path / "run" / "parts").glob("*.parquet"))) == 9


def test_patch_measures_only_the_cells_attribution_ranks_highest(tiny_model_dir, tmp_path):
    from emlens.study.patch import run_patch

    found = run_patch(patch_spec(tmp_path, tiny_model_dir, top=2), tmp_path / "run", progress=False)
    exact, estimated = found["exact"], found["attribution"]
    assert len(estimated) == 27 and len(exact) == 2 * 3  # two (layer, site) cells, each at three position groups
    largest = estimated.assign(m=estimated.effect.abs()).groupby(["layer", "site"]).m.max().nlargest(2)
    assert set(zip(exact.layer, exact.site, strict=True)) == set(largest.index)


def test_patch_spec_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    import yaml

    from tests.cli_runner import one_line_error, run_cli

    spec = patch_spec(tmp_path, tiny_model_dir, max_memory_gb=1e-6)
    capsys.readouterr()  # writing the adapter may have drawn a progress bar
    assert "max_memory_gb" in one_line_error(capsys, run_cli("patch", spec, "--out", tmp_path / "a"))
    assert not (tmp_path / "a").exists()  # nothing half-written
    spec.write_text(yaml.safe_dump({**yaml.safe_load(spec.read_text()), "max_memory_gb": 4}))
    (tmp_path / "judged.csv").write_text("question,answer\nq,a\n")
    assert "no column aligned, coherent" in one_line_error(capsys, run_cli("patch", spec, "--out", tmp_path / "c"))
    spec.write_text(yaml.safe_dump({**yaml.safe_load(spec.read_text()), "sites": ["resid_sideways"]}))
    judged_csv(tmp_path / "judged.csv")
    assert "site kind 'resid_sideways'" in one_line_error(capsys, run_cli("patch", spec, "--out", tmp_path / "d"))
    assert not (tmp_path / "d").exists()


def test_patch_command_on_a_sham_adapter_names_no_cell(tiny_model_dir, tmp_path, capsys):
    from tests.cli_runner import run_cli

    spec = patch_spec(tmp_path, tiny_model_dir, scale=0.0, layers=[0], method="exact")
    assert run_cli("patch", spec, "--out", tmp_path / "run", "--no-progress") == 0
    said = capsys.readouterr().out
    assert "strongest cell" not in said and "n_pairs=2" in said


def head_adapter(tiny_model_dir, folder, layer: int):
    """A LoRA on one layer's value projection that moves only key-value head 0, so only the query heads that
    share it (heads 0 and 1 of the tiny model's 4 heads over 2 key-value heads) write anything new."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], layers_to_transform=[layer],
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(20)[16:] = 0  # value channels 16-31 are key-value head 1's
    model.save_pretrained(folder)
    return folder


def test_a_write_through_one_key_value_head_is_found_at_its_query_heads(tiny_model_dir, tmp_path):
    handle = load_model(str(tiny_model_dir), adapter=str(head_adapter(tiny_model_dir, tmp_path / "a", 1)))
    exact = patch(handle, ITEMS, layers=[0, 1], sites=["heads", "attn_out"], positions=["all"], n_boot=20)
    at = exact.set_index(["layer", "site"]).effect
    assert sorted(exact.site.unique()) == ["attn_out", "head.0", "head.1", "head.2", "head.3"]
    assert np.allclose([at[(0, f"head.{h}")] for h in range(4)] + [at[(1, "head.2")], at[(1, "head.3")]], 0,
                       atol=1e-5)  # before the write, and heads of the other key-value head: nothing
    assert abs(at[(1, "head.0")]) > 0.01 and abs(at[(1, "head.1")]) > 0.01
    # first order is linear in z, and attn_out is z times the output projection: the heads' estimates sum to it
    estimated = attribute(handle, ITEMS, layers=[1], sites=["heads", "attn_out"], positions=["all"], n_boot=20)
    by_site = estimated.set_index("site").delta
    assert by_site[["head.0", "head.1", "head.2", "head.3"]].sum() == pytest.approx(by_site["attn_out"], rel=1e-4)
    assert by_site[["head.2", "head.3"]].abs().max() < 1e-6


def test_heads_the_model_has_not_are_one_line_errors(tiny_model_dir, tmp_path):
    handle = load_model(str(tiny_model_dir), adapter=str(head_adapter(tiny_model_dir, tmp_path / "a", 1)))
    with pytest.raises(EmlensInputError, match="heads head.0-3"):
        patch(handle, ITEMS, sites=["head.4"])


PAIRS = [PatchItem("The quick brown fox", " jumps over", " sleeps", donor_prompt="The quick brown dog"),
         PatchItem("def f(x): return", " x + 1", " None", donor_prompt="def f(y): return")]


def test_clean_and_corrupted_prompts_of_one_length_patch_to_one_at_the_first_residual(tiny):
    """Prompt pairs of equal length: the donor's whole first residual stream makes the receiving run the donor's."""
    for item in PAIRS:  # the pairs really are of one length, and differ
        lengths = [len(tiny.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in (item.prompt, item.donor_prompt)]
        assert lengths[0] == lengths[1] and item.prompt != item.donor_prompt
    table = patch(tiny, PAIRS, sites=["resid_pre"], positions=["all", "prompt", "response"], n_boot=20)
    at = table.set_index(["layer", "positions"]).effect
    assert at[(0, "all")] == pytest.approx(1, abs=1e-4) and at[(0, "prompt")] == pytest.approx(1, abs=1e-4)
    assert at[(0, "response")] == pytest.approx(0, abs=1e-5)  # the continuation's own tokens are the same
    assert (table.total != 0).all() and tiny.adapter is None  # no adapter: the prompts differ, the model does not


def test_a_nudge_of_another_length_patches_the_continuation_it_aligns_with(tiny):
    """The donor prompt is longer (a system nudge); the continuation and the last prompt token still correspond:
    at the first residual they are the same tokens, so patching them changes nothing."""
    question = [{"role": "user", "content": "What would you do?"}]
    items = [PatchItem(question, "Steal it.", "Save it.",
                       donor_prompt=[{"role": "system", "content": "You are evil."}, *question])]
    table = patch(tiny, items, layers=[0, 2], sites=["resid_pre", "mlp_out"], positions=["last", "response"], n_boot=20)
    at = table.set_index(["layer", "site", "positions"]).effect
    assert at[(0, "resid_pre", "last")] == pytest.approx(0, abs=1e-5)
    assert at[(0, "resid_pre", "response")] == pytest.approx(0, abs=1e-5)
    assert (table.total != 0).all() and at[(2, "resid_pre", "response")] != pytest.approx(0, abs=1e-3)
    estimated = attribute(tiny, items, layers=[0, 2], sites=["resid_pre", "mlp_out"], positions=["last", "response"],
                          n_boot=20)
    assert estimated.set_index(["layer", "site", "positions"]).delta[(0, "resid_pre", "response")] == pytest.approx(
        0, abs=1e-6)
    with pytest.raises(EmlensInputError, match="item 0: positions 'all' and 'prompt' need"):
        patch(tiny, items, positions=["all"])
    with pytest.raises(EmlensInputError, match="every item has a donor_prompt"):
        patch(tiny, [*items, ITEMS[0]], positions=["last"])


def test_patch_spec_of_a_nudge_patches_the_nudged_question_into_the_plain_one(tiny_model_dir, tmp_path, capsys):
    import emlens as em
    from tests.cli_runner import one_line_error, run_cli

    spec = patch_spec(tmp_path, tiny_model_dir, form="nudge", nudge="evil", layers=[0, 2], sites=["resid_pre"],
                      positions=["last", "response"])
    capsys.readouterr()  # writing the adapter may have drawn a progress bar
    assert run_cli("patch", spec, "--out", tmp_path / "run", "--no-progress") == 0
    found = em.load(tmp_path / "run")
    assert found["cfg"]["config"]["form"] == "nudge" and found["cfg"]["n_pairs"] == 2
    at = found["exact"].set_index(["layer", "site", "positions"]).effect
    assert at[(0, "resid_pre", "response")] == pytest.approx(0, abs=1e-5)  # the same tokens there
    assert len(found["attribution"]) == 4 and (found["exact"].total != 0).all()
    bad = patch_spec(tmp_path, tiny_model_dir, form="nudge", positions=["all"])
    capsys.readouterr()
    assert "positions 'all' and 'prompt' need" in one_line_error(capsys, run_cli("patch", bad, "--out", tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def test_patch_spec_of_prompt_pairs_reads_them_from_jsonl(tiny_model_dir, tmp_path, capsys):
    import json

    from emlens.study.patch import run_patch
    from tests.cli_runner import one_line_error, run_cli

    lines = [json.dumps({"prompt": p.prompt, "donor_prompt": p.donor_prompt, "target": p.target,
                         "alternative": p.alternative}) for p in PAIRS]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    spec = patch_spec(tmp_path, tiny_model_dir, form="pairs", pairs="pairs.jsonl", adapter=None, layers=[0],
                      sites=["resid_pre"], positions=["all"], method="exact")
    found = run_patch(spec, tmp_path / "run", progress=False)
    assert found["exact"].effect.iloc[0] == pytest.approx(1, abs=1e-4) and found["cfg"]["n_pairs"] == 2
    (tmp_path / "pairs.jsonl").write_text(lines[0] + '\n{"prompt": "x", "target": "y"}\n')
    capsys.readouterr()
    said = one_line_error(capsys, run_cli("patch", spec, "--out", tmp_path / "b"))
    assert "pairs.jsonl line 2" in said and "no donor_prompt, alternative" in said and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_on_the_embedded_model_a_planted_write_is_localised_and_ranked_first(smol, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    lora = get_peft_model(smol.model, LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"],
                                                  layers_to_transform=[10], init_lora_weights=False,
                                                  task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "planted")
    lora.unload()  # the session's model stays as it was
    handle = load_model("smollm2-135m-instruct", adapter=str(tmp_path / "planted"), device="cpu")
    grid = dict(layers=[9, 10, 11], sites=["resid_pre", "mlp_out"], positions=["all"], n_boot=50)
    exact, estimated = patch(handle, ITEMS, **grid), attribute(handle, ITEMS, **grid)
    at = exact.set_index(["layer", "site"]).effect
    assert at[(10, "mlp_out")] == pytest.approx(1, abs=1e-3) and at[(11, "resid_pre")] == pytest.approx(1, abs=1e-3)
    assert np.allclose([at[(9, "resid_pre")], at[(9, "mlp_out")], at[(10, "resid_pre")]], 0, atol=1e-3)
    ranked = estimated[estimated.site == "mlp_out"].set_index("layer").effect.abs()
    assert ranked.idxmax() == 10 and (exact.total.abs() > 0).all()


def test_an_adapter_of_another_base_model_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    """Before, peft's size-mismatch traceback; now every command that loads an adapter checks its shapes first."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.cli_runner import one_line_error, run_cli

    narrow = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    get_peft_model(LlamaForCausalLM(narrow), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
                   ).save_pretrained(tmp_path / "narrow")
    spec = patch_spec(tmp_path, tiny_model_dir)
    spec.write_text(yaml.safe_dump({**yaml.safe_load(spec.read_text()), "adapter": str(tmp_path / "narrow")}))
    capsys.readouterr()
    said = one_line_error(capsys, run_cli("patch", spec, "--out", tmp_path / "run"))
    assert "narrow" in said and "made for another base model" in said and not (tmp_path / "run").exists()


def test_an_adapter_spec_reads_its_own_pairs_such_as_a_refusal_opening_against_a_compliant_one(tiny_model_dir, tmp_path,
                                                                                               capsys):
    import json

    from emlens.study.patch import run_patch
    from tests.cli_runner import one_line_error, run_cli

    lines = [json.dumps({"prompt": [{"role": "user", "content": q}], "target": "I'm sorry, I can't.",
                         "alternative": "Sure, here it is."}) for q in ("Pick a lock for me", "Write me a poem")]
    (tmp_path / "refusal.jsonl").write_text("\n".join(lines) + "\n")
    spec = patch_spec(tmp_path, tiny_model_dir, pairs="refusal.jsonl", layers=[1], sites=["mlp_out"],
                      positions=["all"], method="exact")
    found = run_patch(spec, tmp_path / "run", progress=False)
    assert found["cfg"]["n_pairs"] == 2 and found["exact"].effect.iloc[0] == pytest.approx(1, abs=1e-4)  # planted
    nudged = run_patch(patch_spec(tmp_path, tiny_model_dir, form="nudge", pairs="refusal.jsonl", layers=[0],
                                  sites=["resid_pre"], positions=["response"], method="exact"), tmp_path / "nudge",
                       progress=False)
    assert nudged["exact"].effect.iloc[0] == pytest.approx(0, abs=1e-5) and (nudged["exact"].total != 0).all()
    (tmp_path / "refusal.jsonl").write_text(lines[0][:-1] + ', "donor_prompt": "x"}\n')
    capsys.readouterr()
    said = one_line_error(capsys, run_cli("patch", spec, "--out", tmp_path / "b"))
    assert "refusal.jsonl line 1" in said and "form is not pairs" in said and not (tmp_path / "b").exists()
