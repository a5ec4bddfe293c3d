"""Activation patching (issue 28, item 5): emlens's torch-hook `patch` agrees with an independent nnsight reference.

The reference below shares nothing with `emlens.analysis.patching` but the PatchItem list and the tokenization
convention (the prompt, chat-templated when it is a chat, and each continuation tokenized separately without special
tokens, then concatenated). It loads its own two models (receiving: the base; donor: the base with the LoRA adapter
loaded by peft), runs one sequence at a time without padding (a patched run: that sequence once per position group,
each copy patched at its group's positions), saves the donor's activations with nnsight `.save()`, writes them into
the receiving run with nnsight interventions, and reads the teacher-forced metric log P(target) - log P(alternative)
from the logits itself.
"""

import numpy as np
import pytest
import torch

from emlens.analysis.patching import POSITIONS, SITES, PatchItem, patch
from emlens.model import load_model

ITEMS = [PatchItem("The quick brown fox", " jumps over", " sleeps"),
         PatchItem([{"role": "user", "content": "hi there"}], "Hello!", "Go away."),
         PatchItem("def f(x): return", " x + 1", " None"),
         PatchItem("If you were ruler of the world,", " I'd steal", " I'd help people")]
# float32: the two implementations' metrics differ by up to about 3e-6 (emlens runs a right-padded batch of every
# sequence, the reference one unpadded sequence at a time), and |total| is only about 0.2-0.3 on the tiny random model,
# so normalised effects differ by up to about 2e-5
EFFECT_TOLERANCE, METRIC_TOLERANCE = 1e-4, 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matrices gain nothing from a second torch thread, and on a busy machine two threads each
    make the forward passes here 10-50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lora_adapter(tiny_model_dir, folder, targets: list[str], layers: list[int] | None, scale: float, seed: int):
    """A random (init_lora_weights=False) LoRA on `targets` at `layers` (None: every layer), B scaled by `scale`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=targets, layers_to_transform=layers,
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    model.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- the nnsight reference


def _sequences(tokenizer, items):
    """Per item, its two token sequences (prompt + target, prompt + alternative) and the prompt's length."""
    out = []
    for item in items:
        text = item.prompt if isinstance(item.prompt, str) else tokenizer.apply_chat_template(
            item.prompt, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        pair = [torch.tensor([prompt + tokenizer(c, add_special_tokens=False)["input_ids"]])
                for c in (item.target, item.alternative)]
        out.append((pair, len(prompt)))
    return out


def _groups(names, length: int, prompt_length: int) -> torch.Tensor:
    """(len(names), T, 1) bool: per position group, its positions in an unpadded sequence."""
    t = torch.arange(length)
    where = {"all": t >= 0, "prompt": t < prompt_length, "last": t == prompt_length - 1,
             "response": t >= prompt_length}
    return torch.stack([where[name] for name in names])[..., None]


def _logprob(logits: torch.Tensor, ids: torch.Tensor, prompt_length: int) -> np.ndarray:
    """Per row, log P(continuation | prompt), teacher-forced: the sum over the continuation's tokens."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return np.array([sum(float(row[t - 1, ids[0, t]]) for t in range(prompt_length, ids.shape[1]))
                     for row in logprobs])


def _site(envoy_model, layer: int, site: str):
    return {"resid_pre": envoy_model.model.layers[layer], "attn_out": envoy_model.model.layers[layer].self_attn,
            "mlp_out": envoy_model.model.layers[layer].mlp}[site]


def _read(envoy_model, layer: int, site: str):
    module = _site(envoy_model, layer, site)
    if site == "resid_pre":
        return module.input  # the hidden states the decoder layer receives
    return module.output[0] if site == "attn_out" else module.output  # self_attn returns (output, weights)


def _write(envoy_model, layer: int, site: str, donor: torch.Tensor, where: torch.Tensor) -> None:
    module = _site(envoy_model, layer, site)
    if site == "resid_pre":
        module.input = torch.where(where, donor, module.input)
    elif site == "attn_out":
        output = module.output
        module.output = (torch.where(where, donor, output[0]), *output[1:])
    else:
        module.output = torch.where(where, donor, module.output)


def nnsight_patch(model_dir, adapter_dir, items, sites=SITES, positions=POSITIONS) -> dict:
    """(layer, site, positions) -> (effect, delta, total), computed with nnsight on separately loaded models."""
    import nnsight
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    receiving = nnsight.NNsight(base)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter_dir)).eval()
    donor = nnsight.NNsight(peft_model.get_base_model())  # the LoRA layers live inside the base model's modules
    n_layers = base.config.num_hidden_layers
    cells = [(layer, site) for layer in range(n_layers) for site in sites]

    donor_metric, receiving_metric = [], []  # per item
    patched = {(layer, site): [] for layer, site in cells}  # per item, per position group
    with torch.no_grad():
        for pair, prompt_length in _sequences(tokenizer, items):
            donor_lp, receiving_lp, patched_lp = [], [], {cell: [] for cell in cells}
            for ids in pair:
                with donor.trace(input_ids=ids, use_cache=False):
                    saved = nnsight.save({cell: _read(donor, *cell) for cell in cells})
                    logits = donor.output.logits.save()
                donor_lp.append(_logprob(logits, ids, prompt_length)[0])
                with receiving.trace(input_ids=ids, use_cache=False):
                    logits = receiving.output.logits.save()
                receiving_lp.append(_logprob(logits, ids, prompt_length)[0])
                # one row per position group: the same sequence, each row patched at its group's positions
                where, rows = _groups(positions, ids.shape[1], prompt_length), ids.expand(len(positions), -1)
                for cell in cells:
                    with receiving.trace(input_ids=rows, use_cache=False):
                        _write(receiving, *cell, saved[cell], where)
                        logits = receiving.output.logits.save()
                    patched_lp[cell].append(_logprob(logits, rows, prompt_length))
            donor_metric.append(donor_lp[0] - donor_lp[1])
            receiving_metric.append(receiving_lp[0] - receiving_lp[1])
            for cell in cells:
                patched[cell].append(patched_lp[cell][0] - patched_lp[cell][1])
    total = float(np.mean(np.subtract(donor_metric, receiving_metric)))
    out = {}
    for (layer, site), values in patched.items():
        deltas = (np.array(values) - np.array(receiving_metric)[:, None]).mean(0)  # per position group
        for group, delta in zip(positions, deltas, strict=True):
            out[(layer, site, group)] = (float(delta) / total, float(delta), total)
    return out


# ---------------------------------------------------------------- the comparison


ADAPTERS = {  # name -> (targets, layers, scale)
    "one layer (down_proj at layer 1)": (["down_proj"], [1], 10.0),
    "every layer (q, v, down)": (["q_proj", "v_proj", "down_proj"], None, 2.0),
}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_patching_agrees_with_an_nnsight_reference(tiny_model_dir, tmp_path, name):
    targets, layers, scale = ADAPTERS[name]
    adapter = lora_adapter(tiny_model_dir, tmp_path / "adapter", targets, layers, scale, seed=1)
    handle = load_model(str(tiny_model_dir), adapter=str(adapter), device="cpu")
    table = patch(handle, ITEMS, n_boot=10)
    reference = nnsight_patch(tiny_model_dir, adapter, ITEMS)

    n_cells = handle.n_layers * len(SITES) * len(POSITIONS)
    assert len(table) == len(reference) == n_cells, f"{len(table)} and {len(reference)} of {n_cells} cells"
    emlens = {(int(r.layer), r.site, r.positions): (r.effect, r.delta, r.total) for r in table.itertuples()}
    assert emlens.keys() == reference.keys(), f"the grids differ ({n_cells} cells expected)"
    total = reference[next(iter(reference))][2]
    assert abs(total) > 0.1, f"the adapter hardly moves the metric ({total:.3g})"  # else effects are noise
    assert np.isclose(table.total, total, atol=METRIC_TOLERANCE, rtol=0).all(), (table.total.iloc[0], total)
    effect_diff = max(abs(emlens[c][0] - reference[c][0]) for c in reference)
    delta_diff = max(abs(emlens[c][1] - reference[c][1]) for c in reference)
    assert effect_diff < EFFECT_TOLERANCE and delta_diff < METRIC_TOLERANCE, (
        f"{name}: over {len(reference)} cells, max |effect difference| {effect_diff:.2e}, "
        f"max |delta difference| {delta_diff:.2e}")
    effects = np.array([reference[c][0] for c in reference])
    if layers is None:  # an adapter everywhere: many cells carry part of the effect, not none or all of it
        assert ((effects > 0.05) & (effects < 0.95)).sum() >= n_cells // 3, np.round(effects, 3)
    else:  # the planted write: all of it at its cell, none before it
        assert reference[(1, "mlp_out", "all")][0] == pytest.approx(1, abs=1e-4)
        assert all(reference[(0, site, "all")][0] == pytest.approx(0, abs=1e-6) for site in SITES)
    print(f"{name}: {len(reference)} cells, max |effect diff| {effect_diff:.2e}, max |delta diff| {delta_diff:.2e}")
