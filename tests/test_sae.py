"""SAEs with sae-lens on emlens's activation stores (tiny random model: the numbers test the plumbing)."""

import json
import shutil

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
