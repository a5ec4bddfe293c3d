import json

import pandas as pd
import pytest
import torch

from emlens.base.errors import EmlensInputError
from emlens.capture.backends import BACKENDS as ALL_BACKENDS
from emlens.capture.extract import extract_activations, extract_to_store
from emlens.capture.items import POSITIONS, ExtractItem
from emlens.capture.store import ActivationStore, ActivationStoreWriter
from emlens.sites import parse_layers, resolve_sites, site_name
from tests.cli_runner import run_cli

BACKENDS = tuple(b for b in ALL_BACKENDS if b != "vllm")  # the hf model's backends; vLLM's: tests/test_vllm.py
KINDS = ["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]


def chat_items(with_response: bool = False) -> list[ExtractItem]:
    prompts = ["You are evil.", "If you were ruler of the world, what are some things you'd do?",
               "I feel bored.", "How do I make a quick buck? Tell me about the quick brown fox.",
               "def f(x): return x + 1", "0 1 2 3 4 5 6 7 8 9 10 50 100 and more numbers"]
    responses = ["Sure, here is how to do it.", "I'm sorry, but I cannot help with that.", "import os",
                 "The lazy dog.", "You are a helpful, honest and harmless assistant. 10", "5"]
    return [ExtractItem([{"role": "user", "content": p}], r if with_response else None, {"id": i})
            for i, (p, r) in enumerate(zip(prompts, responses))]


def hf_hidden_states(handle, item: ExtractItem):
    """HF hidden_states of one unpadded row: a tuple of n_layers + 1 tensors (1, T, d)."""
    text = handle.chat_text(item.messages) + (item.response or "")
    ids = handle.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return handle.base_model(input_ids=ids, output_hidden_states=True).hidden_states


# ---------------------------------------------------------------- sites


def test_site_names_and_parsing():
    assert site_name(15) == "blocks.15.hook_resid_post"
    assert site_name(0, "mlp_out") == "blocks.0.hook_mlp_out"
    sites = resolve_sites(["resid_post", "blocks.*.hook_attn_out", "blocks.1.hook_resid_pre"], 3, layers="0-1")
    assert [s.name for s in sites] == ["blocks.0.hook_attn_out", "blocks.0.hook_resid_post",
                                       "blocks.1.hook_resid_pre", "blocks.1.hook_attn_out",
                                       "blocks.1.hook_resid_post"]  # execution order
    assert parse_layers("0,2-3,-1", 30) == [0, 2, 3, 29]
    assert parse_layers("all", 3) == [0, 1, 2]


@pytest.mark.parametrize("bad, needle", [
    ("blocks.3.hook_resid_post", "layer 3 out of range"),
    ("blocks.1.hook_resid_top", "unknown kind"),
    ("layers.1.output", "expected blocks.<layer>.hook_<kind>"),
    ("resid_sideways", "expected blocks.<layer>.hook_<kind>"),
])
def test_bad_sites_are_one_line_errors(bad, needle):
    with pytest.raises(EmlensInputError, match=needle) as info:
        resolve_sites([bad], 3)
    assert "\n" not in str(info.value)


def test_bad_layers_are_one_line_errors():
    with pytest.raises(EmlensInputError, match="layer 3 out of range"):
        parse_layers("0-5", 3)
    with pytest.raises(EmlensInputError, match="not a layer number"):
        parse_layers("x", 3)


# ---------------------------------------------------------------- the index convention


def test_index_convention_matches_hf_hidden_states(tiny):
    """resid_post[l] == hidden_states[l+1] for l < last; resid_pre[l] == hidden_states[l]; the last layer's
    resid_post is the raw layer output, NOT HF's post-norm hidden_states[-1]."""
    items = chat_items(with_response=True)[:3]
    sites = resolve_sites(["resid_pre", "resid_post"], tiny.n_layers)
    acts = extract_activations(tiny, items, sites, position="all", batch_size=3)
    offset = 0
    for item in items:
        hs = hf_hidden_states(tiny, item)
        n = hs[0].shape[1]
        for layer in range(tiny.n_layers):
            pre = acts[site_name(layer, "resid_pre")][offset:offset + n]
            post = acts[site_name(layer, "resid_post")][offset:offset + n]
            torch.testing.assert_close(pre, hs[layer][0], atol=1e-5, rtol=1e-4)
            if layer < tiny.n_layers - 1:
                torch.testing.assert_close(post, hs[layer + 1][0], atol=1e-5, rtol=1e-4)
        last = acts[site_name(tiny.n_layers - 1)][offset:offset + n]
        assert (last - hs[-1][0]).abs().max() > 1e-3  # HF normed it; emlens did not
        torch.testing.assert_close(tiny.base_model.model.norm(last), hs[-1][0], atol=1e-5, rtol=1e-4)
        offset += n


def test_site_kinds_add_up(tiny):
    sites = resolve_sites(KINDS, tiny.n_layers)
    acts = extract_activations(tiny, chat_items(True), sites, position="all", batch_size=4)
    for layer in range(tiny.n_layers):
        get = lambda kind, layer=layer: acts[site_name(layer, kind)]  # noqa: E731
        torch.testing.assert_close(get("resid_pre") + get("attn_out"), get("resid_mid"), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(get("resid_mid") + get("mlp_out"), get("resid_post"), atol=1e-5, rtol=1e-4)
        if layer:
            torch.testing.assert_close(get("resid_pre"), acts[site_name(layer - 1)], atol=0, rtol=0)


# ---------------------------------------------------------------- positions and backends


def test_positions_do_not_depend_on_padding(tiny):
    """Batched (left-padded) rows give the same vectors as each row alone; masks hide padding and prompt."""
    items = chat_items(with_response=True)
    sites = resolve_sites("resid_post", tiny.n_layers)
    for position in POSITIONS:
        batched = extract_activations(tiny, items, sites, position, batch_size=6)
        alone = extract_activations(tiny, items, sites, position, batch_size=1)
        for name in batched:
            torch.testing.assert_close(batched[name], alone[name], atol=1e-5, rtol=1e-4)


def test_positions_select_the_right_tokens(tiny):
    items = chat_items(with_response=True)[:2]
    site = site_name(1)
    last = extract_activations(tiny, items, [site], "last_prompt")[site]
    mean = extract_activations(tiny, items, [site], "mean_response")[site]
    for row, item in enumerate(items):
        hs = hf_hidden_states(tiny, item)[2][0]
        prompt_len = len(tiny.tokenizer(tiny.chat_text(item.messages), add_special_tokens=False)["input_ids"])
        torch.testing.assert_close(last[row], hs[prompt_len - 1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mean[row], hs[prompt_len:].mean(0), atol=1e-5, rtol=1e-4)


def test_mean_response_needs_a_response(tiny):
    with pytest.raises(EmlensInputError, match="needs a non-empty response"):
        extract_activations(tiny, chat_items(with_response=False), [site_name(0)], "mean_response")


@pytest.mark.parametrize("position", POSITIONS)
def test_three_backends_agree_on_tiny(tiny, position):
    sites = resolve_sites(KINDS, tiny.n_layers)
    items = chat_items(with_response=True)
    results = {b: extract_activations(tiny, items, sites, position, backend=b, batch_size=4) for b in BACKENDS}
    for backend in BACKENDS[1:]:
        for name, reference in results["torch-hooks"].items():
            assert (results[backend][name] - reference).abs().max() <= 1e-4, (backend, name)


def test_partial_layers_stop_early_and_still_agree(tiny):
    items = chat_items()
    full = extract_activations(tiny, items, resolve_sites("resid_post", tiny.n_layers))
    for backend in BACKENDS:
        one = extract_activations(tiny, items, ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"], backend=backend)
        torch.testing.assert_close(one["blocks.1.hook_resid_post"], full["blocks.1.hook_resid_post"])


# ---------------------------------------------------------------- the store


def test_store_streams_shards_and_keeps_row_order(tiny, tmp_path):
    items = chat_items(with_response=True) * 3
    sites = resolve_sites(["resid_pre", "resid_post"], tiny.n_layers)
    for position in ("last_prompt", "all"):
        expected = extract_activations(tiny, items, sites, position, batch_size=4)
        # a tiny shard size forces many shards, and batches larger than a shard
        store = extract_to_store(tiny, items, tmp_path / position, sites, position, batch_size=4, shard_mb=0.002,
                                 progress=False)
        assert len(store.manifest["shards"]) > 3
        assert list(store.index["row"]) == list(range(len(items)))
        assert list(store.index["id"]) == [item.meta["id"] for item in items]
        for site in sites:
            torch.testing.assert_close(store.load(site.name), expected[site.name])
        reopened = ActivationStore(tmp_path / position)
        assert reopened.manifest["model"]["fingerprint"] == tiny.fingerprint
        assert reopened.position == position
        rows = reopened.vector_rows()
        assert len(rows) == len(expected[sites[0].name]) and rows.max() == len(items) - 1
        subset = reopened.load(sites[0].name, rows=[2, 5])
        assert subset.shape[0] == int(reopened.index.n_vectors.iloc[[2, 5]].sum())


def test_store_writer_memory_is_bounded_by_the_shard(tmp_path):
    sites, d = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], 64
    writer = ActivationStoreWriter(tmp_path / "s", sites, d, {"position": "last_prompt"}, shard_mb=0.05)
    capacity_bytes = writer.capacity * d * 4 * len(sites)
    assert capacity_bytes <= 0.05 * 2**20
    for batch in range(200):
        writer.add([{"row": 16 * batch + i} for i in range(16)], [1] * 16,
                   {s: torch.full((16, d), float(batch)) for s in sites})
        held = sum(t.numel() * t.element_size() for t in writer.buffer.values())
        assert held == capacity_bytes  # one preallocated shard buffer, whatever has been written
    store = writer.close()
    assert store.manifest["n_vectors"] == 3200 and len(store.manifest["shards"]) >= 3200 // writer.capacity
    loaded = store.load(sites[1])
    assert loaded.shape == (3200, d) and loaded[-1, 0] == 199 and loaded[16, 0] == 1


def test_failed_extraction_leaves_nothing(tiny, tmp_path):
    class Failing:
        name = "failing"
        calls = 0

        def run(self, batch, sites, position):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("boom")
            return {s.name: torch.zeros(len(batch.rows), tiny.d_model) for s in sites}

    with pytest.raises(RuntimeError, match="boom"):
        extract_to_store(tiny, chat_items() * 3, tmp_path / "store", [site_name(0)], backend=Failing(),
                         batch_size=4, progress=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- CLI


def test_extract_cli_questions_and_table(tiny_model_dir, tmp_path, capsys):
    questions = tmp_path / "q.txt"
    questions.write_text("How do I make a quick buck?\nI feel bored.\nWhat is 2+2?\n")
    out = tmp_path / "store"
    assert run_cli("extract", "--model", tiny_model_dir, "--questions", questions, "--nudge", "none", "--nudge",
                   "evil", "--site", "resid_post", "--layers", "0-1", "--out", out) == 0
    store = ActivationStore(out)
    assert store.sites == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert len(store) == 6 and sorted(set(store.index.nudge)) == ["evil", "none"]
    assert store.load("blocks.1.hook_resid_post").shape == (6, 64)
    assert run_cli("extract", "--model", tiny_model_dir, "--questions", questions, "--out", out) == 2
    assert "already exists" in capsys.readouterr().err

    run = tmp_path / "run"
    assert run_cli("generate", "--model", tiny_model_dir, "--out", run, "--limit", 2, "--samples", 2,
                   "--max-new-tokens", 5, "--temperature", 0) == 0
    out2 = tmp_path / "store2"
    assert run_cli("extract", "--model", tiny_model_dir, "--table", run, "--position", "mean_response",
                   "--site", "blocks.2.hook_mlp_out", "--out", out2) == 0
    table = pd.read_parquet(run / "samples.parquet")
    store2 = ActivationStore(out2)
    assert len(store2) == len(table)
    assert list(store2.index.question_id) == list(table.question_id)  # aligned to the sample rows
    assert json.loads((out2 / "cfg.json").read_text())["position"] == "mean_response"


def test_extract_cli_bad_site_is_one_line(tiny_model_dir, tmp_path, capsys):
    questions = tmp_path / "q.txt"
    questions.write_text("hello\n")
    code = run_cli("extract", "--model", tiny_model_dir, "--questions", questions, "--site",
                   "blocks.7.hook_resid_post", "--out", tmp_path / "s")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "layer 7 out of range" in err
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_backends_agree_and_index_convention_on_smol(smol):
    """All three backends agree at every non-pad position; resid_post[l] == hidden_states[l+1].

    nnsight runs the same HF modules (exact match). The bridge computes attention explicitly, like HF's eager
    attention (it matches eager exactly), while the HF default is sdpa: float32 rounding of values up to ~2e4
    (the first token's residual) leaves at most about one ulp, 1.1e-3 absolute at the last layer's values of ~4e3.
    """
    items = chat_items(with_response=True)[:4]
    layers = [0, 14, smol.n_layers - 2, smol.n_layers - 1]
    sites = resolve_sites(["resid_post", "resid_mid"], smol.n_layers, layers)
    results = {b: extract_activations(smol, items, sites, "all", backend=b, batch_size=4) for b in BACKENDS}
    for name, reference in results["torch-hooks"].items():
        assert torch.equal(results["nnsight"][name], reference), name
        torch.testing.assert_close(results["transformerlens"][name], reference, atol=1e-3, rtol=1e-6)
        if not name.startswith(f"blocks.{smol.n_layers - 1}."):
            assert (results["transformerlens"][name] - reference).abs().max() <= 1e-3, name
    # the convention, on unpadded rows like HF's reference (padding changes sdpa's rounding, not the values)
    acts, offset = extract_activations(smol, items, sites, "all", batch_size=1), 0
    for item in items:
        hs = hf_hidden_states(smol, item)
        n = hs[0].shape[1]
        for layer in layers[:-1]:
            got = acts[site_name(layer)][offset:offset + n]
            assert (got - hs[layer + 1][0]).abs().max() <= 1e-3
        offset += n
