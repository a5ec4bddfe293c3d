"""SAE autointerp (`emlens sae explain`): explanations scored by detection and fuzzing, failures never scored.

Fast tests: a random TopK SAE on the tiny random model, the tiny model itself as explainer and scorer (its answers
are nonsense: every one must be a counted, printed failure). The slow test: a real SAE trained on the embedded
model, and the embedded model behind llama.cpp's OpenAI-compatible server on loopback as explainer and scorer.
"""

import json

import numpy as np
import pandas as pd
import pytest

from emlens.base.errors import EmlensInputError
from tests.cli_runner import one_line_error, run_cli

pytest.importorskip("sae_lens")
SITE = "blocks.1.hook_resid_post"
TEXTS = [f"{subject} {verb} {thing} on day {n}." for n, (subject, verb, thing) in enumerate(
    [(s, v, t) for s in ("The cat", "My neighbour", "A banker", "The robot") for v in ("stole", "found", "sold")
     for t in ("money", "a quick buck", "the code", "ten apples")])]


def save_random_sae(folder, d_in: int = 64, d_sae: int = 128, seed: int = 0, site: str = SITE):
    """A TopK SAE with random weights in the sae-lens format: k latents fire at every token."""
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=8))
    sae.cfg.metadata.hook_name = site
    sae.save_model(str(folder))
    return folder


@pytest.fixture
def random_sae(tmp_path):
    return save_random_sae(tmp_path / "sae")


def small_config(**fields):
    from emlens.sae.explain import ExplainConfig

    return ExplainConfig(**{"window": 8, "n_explain": 4, "n_random": 2, "n_test": 4, "per_prompt": 2,
                            "max_response_tokens": 16, **fields})


def tiny_reader(tiny, tmp_path, max_tokens: int = 12):
    from emlens.judges.base import JudgeCache
    from emlens.sae.text_models import LocalTextModel

    return LocalTextModel(tiny, JudgeCache(tmp_path / "cache.sqlite"), max_tokens=max_tokens)


# ---------------------------------------------------------------- reading answers, measuring


@pytest.mark.parametrize("answer, n, expected", [
    ("[1,0,1]", 3, [1, 0, 1]),
    ("Sure! [1, 0, 0] because...", 3, [1, 0, 0]),
    ("[true, false]", 2, [1, 0]),
    ("1", 1, [1]),
    ("[1,0]", 3, None),  # too short
    ("[1,2,0]", 3, None),  # not a label
    ("[0.5, 1]", 2, None),
    ("1 0 1", 3, None),
    ("", 2, None),
])
def test_scorer_answers_are_a_list_of_n_labels_or_nothing(answer, n, expected):
    from emlens.sae.explain_prompts import parse_labels

    assert parse_labels(answer, n) == expected


def test_an_explanation_is_the_marked_line_or_nothing():
    from emlens.sae.explain_prompts import parse_explanation, read_explanation

    assert parse_explanation("Step 1...\n[EXPLANATION]: Money and payments.\nExample 9: more") == "Money and payments."
    assert parse_explanation("[explanation] \"Code that opens files\"") == "Code that opens files"
    for nonsense in ("Money and payments.", "[EXPLANATION]:", "[EXPLANATION]: ...", ""):
        assert parse_explanation(nonsense) is None
    # the embedded model behind llama.cpp answered this, word for word: the worked example's explanation
    assert read_explanation("[EXPLANATION]: Money, prices and payments.") == (
        None, "the explainer copied the worked example's explanation")
    assert read_explanation("[EXPLANATION]: Imports of os.")[0] == "Imports of os."


def test_highlights_merge_runs_and_fuzzing_moves_them_off_the_firing_tokens():
    import torch

    from emlens.sae.explain import firing_marks, shuffled_marks
    from emlens.sae.explain_prompts import highlight

    values = torch.tensor([0.0, 2.0, 5.0, 0.1, 0.0, 4.0])
    marks = firing_marks(values, 0.3)
    assert marks == [False, True, True, False, False, True]
    assert highlight(["a", " b", " c", " d", "\n", "f"], marks) == "a<< b c>> d\\n<<f>>"
    moved = shuffled_marks(marks, np.random.default_rng(0))
    assert sum(moved) == 3 and not any(m and f for m, f in zip(moved, marks))
    assert firing_marks(torch.zeros(3), 0.3) == [False] * 3  # a silent window has nothing to mark


def test_balanced_accuracy_weighs_both_classes_and_its_interval_is_never_a_point():
    from emlens.sae.explain import balanced_accuracy

    truth = np.array([1] * 8 + [0] * 2)
    always_yes = balanced_accuracy(truth, np.ones(10, dtype=int))
    assert always_yes["value"] == pytest.approx(0.5) and always_yes["n"] == 10  # plain accuracy would say 0.8
    perfect = balanced_accuracy(truth, truth)
    assert perfect["value"] == 1.0 and perfect["ci_low"] < 0.95 and perfect["ci_high"] == 1.0
    assert np.isnan(balanced_accuracy(np.ones(3, dtype=int), np.ones(3, dtype=int))["value"])  # one class only


# ---------------------------------------------------------------- the tiny model as explainer and scorer


def test_windows_hold_each_tokens_own_activation_and_never_repeat(tiny, random_sae):
    import torch

    import emlens as em
    from emlens.capture.items import ExtractItem
    from emlens.sae.artifact import load_sae
    from emlens.sae.explain import latent_windows

    loaded = load_sae(random_sae)
    items = [ExtractItem([{"role": "user", "content": text}]) for text in TEXTS[:6]]
    windows = latent_windows(loaded, tiny, items, [3, 7], small_config(window=5))
    alone = [em.activations(tiny, [item.messages], sites=[SITE], position="all")[SITE] for item in items]
    seen = set()
    for w in range(len(windows.rows)):
        row, start, length = int(windows.rows[w]), int(windows.starts[w]), int(windows.lengths[w])
        assert start >= 1 and 4 <= length <= 5 and (start - 1) % 5 == 0  # the attention sink never in a window
        expected = loaded.encode(alone[row][start:start + length])[:, [3, 7]]
        for column in (0, 1):
            assert torch.allclose(windows.values(w, column), expected[:, column], atol=1e-4)
            assert windows.peak[w, column] == pytest.approx(float(expected[:, column].max()), abs=1e-4)
        assert tuple(windows.ids(w)) not in seen  # the chat template's fixed tokens are one window, not six
        seen.add(tuple(windows.ids(w)))
    assert 0 < int(windows.held_out.sum()) < len(windows.rows)




def test_nonsense_answers_are_failures_never_scores_and_a_rerun_sends_nothing(tiny, random_sae, tmp_path):
    from emlens.sae.artifact import load_sae
    from emlens.sae.explain import explain_latents

    reader = tiny_reader(tiny, tmp_path)
    loaded = load_sae(random_sae)
    result = explain_latents(loaded, tiny, [0, 5, 9], reader, texts=TEXTS, config=small_config())
    asked = int((result.scores.status != "too few contexts").sum())
    assert asked > 0 and reader.requests_sent == asked  # one explainer request per latent with contexts
    scores = result.scores.set_index("latent")
    assert scores.explanation.isna().all() and set(scores.status) <= {"no explanation", "too few contexts"}
    assert scores.detection.isna().all() and scores.fuzzing.isna().all()
    assert (scores.detection_n == 0).all() and (scores.n_failed[scores.status == "no explanation"] > 0).all()
    assert set(result.failures.stage) <= {"explanation", "contexts"} and len(result.failures) == 3
    shown = result.explanations.set_index("latent").contexts
    assert all("<<" in shown[latent] for latent in scores.index[scores.status == "no explanation"])

    # the same explanations given: the tiny scorer's nonsense leaves every item unscored, each prompt a failure
    given = {latent: "Words about money." for latent in scores.index[scores.status != "too few contexts"]}
    scored = explain_latents(loaded, tiny, list(scores.index), reader, texts=TEXTS, config=small_config(),
                             explanations=given)
    rows = scored.scores.set_index("latent").loc[list(given)]
    assert (rows.status == "given").all() and (rows.explanation == "Words about money.").all()
    assert rows.detection.isna().all() and (rows.detection_n == 0).all() and (rows.fuzzing_n == 0).all()
    items = scored.items
    assert items.prediction.isna().all() and (rows.n_failed == rows.detection_failed + rows.fuzzing_failed).all()
    assert (rows.detection_failed == items[items.task == "detection"].groupby("latent").size()).all()
    prompts = items.groupby(["latent", "task"]).prompt.nunique().sum()
    assert (scored.failures.stage.isin(["detection", "fuzzing"])).sum() == prompts  # one failure per prompt
    assert set(items.groupby("prompt").size()) <= {1, 2}  # per_prompt 2
    detection = items[items.task == "detection"]
    assert set(detection.truth) == {0, 1} and not detection.text.str.contains("<<").any()
    fuzzing = items[items.task == "fuzzing"]
    assert fuzzing.text.str.contains("<<").all() and set(fuzzing.truth) == {0, 1}

    # a second run is served from the cache: no new request, the same result
    sent = reader.requests_sent
    again = explain_latents(loaded, tiny, list(scores.index), reader, texts=TEXTS, config=small_config(),
                            explanations=given)
    assert reader.requests_sent == sent
    pd.testing.assert_frame_equal(again.scores, scored.scores)


def test_the_cli_writes_an_artifact_that_loads_and_labels_the_diff(tiny, tiny_model_dir, random_sae, tmp_path,
                                                                   capsys, monkeypatch):
    import emlens as em
    from emlens.sae.artifact import load_sae

    monkeypatch.setenv("EMLENS_CACHE", str(tmp_path / "cache"))  # the explain cache the CLI fills
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    code = run_cli("sae", "explain", random_sae, "--latents", "0,5", "--model", tiny_model_dir, "--texts",
                   tmp_path / "texts.txt", "--explainer", f"hf:{tiny_model_dir}", "--window", "8", "--n-test", "4",
                   "--per-prompt", "2", "--explainer-tokens", "8", "--out", tmp_path / "explained")
    out = capsys.readouterr().out
    assert code == 0 and "failed: latent" in out and "wrote" in out
    loaded = em.load(tmp_path / "explained")
    assert list(loaded.scores.latent) == [0, 5] and loaded.summary["kind"] == "sae_explanations"
    assert loaded.summary["explainer"]["kind"] == "hf" and loaded.summary["n_failed"] > 0
    cfg = json.loads((tmp_path / "explained" / "cfg.json").read_text())
    assert cfg["sae"]["d_sae"] == 128 and cfg["site"] == SITE and cfg["texts"]["n"] == len(TEXTS)

    # labels into `sae diff` and `sae decompose` tables
    labels = {i: f"label {i}" for i in range(0, 128, 2)}  # every other latent: the rest stays unlabelled
    labels_artifact(tmp_path / "labels", load_sae(random_sae), labels)
    assert em.load(tmp_path / "labels").labels() == labels
    adapted = lora_adapter(tiny_model_dir, tmp_path / "adapter")
    assert run_cli("sae", "diff", random_sae, "--adapter", adapted, "--model", tiny_model_dir, "--questions",
                   "betley-first-plot", "--limit", "4", "--top", "6", "--labels", tmp_path / "labels",
                   "--out", tmp_path / "diff") == 0
    for name in ("diff.csv", "contexts.csv"):
        table = pd.read_csv(tmp_path / "diff" / name, keep_default_na=False)
        assert list(table.label) == [labels.get(latent, "") for latent in table.latent], name

    from tests.test_probes import question_texts, write_spec

    (tmp_path / "q.txt").write_text("\n".join(question_texts(6)) + "\n")
    spec = write_spec(tmp_path / "nudge.yaml", name="nudge", method="diff_of_means", position="last_prompt",
                      layers="all", contrast={"positive": {"questions": "q.txt", "nudge": "evil"},
                                              "negative": {"questions": "q.txt", "nudge": "none"}})
    assert run_cli("probe", "fit", spec, "--model", tiny_model_dir, "--out", tmp_path / "dir") == 0
    assert run_cli("sae", "decompose", random_sae, "--direction", tmp_path / "dir", "--model", tiny_model_dir,
                   "--n-random", "10", "--labels", tmp_path / "labels", "--out", tmp_path / "dec") == 0
    for name in ("cosine.csv", "attribution.csv", "contexts.csv"):
        table = pd.read_csv(tmp_path / "dec" / name, keep_default_na=False)
        assert list(table.label) == [labels.get(latent, "") for latent in table.latent], name


def labels_artifact(folder, loaded, labels: dict):
    """An `emlens sae explain` folder holding only given labels (scoring them on the tiny model would take minutes)."""
    from emlens.sae.explain import LatentExplanations, sae_identity, save_explanations

    scores = pd.DataFrame({"latent": list(labels), "explanation": list(labels.values()), "status": "given"})
    empty = pd.DataFrame({"latent": pd.Series(dtype=int)})
    return save_explanations(LatentExplanations(scores, scores, empty, empty, {"sae": sae_identity(loaded)}), folder)


def lora_adapter(model_dir, folder):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["o_proj"], init_lora_weights=False))
    peft_model.save_pretrained(folder)
    return folder


class CannedEndpoint:
    """An OpenAI-compatible server on loopback that answers every chat with the same body (a nonsense endpoint)."""

    def __init__(self, body: dict):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        canned = json.dumps(body).encode()
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # GET /models: the preflight
                self._send(b'{"object": "list", "data": [{"id": "canned"}]}')

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                owner.requests += 1
                self._send(canned)

            def _send(self, payload: bytes):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_an_endpoint_that_answers_nonsense_gets_failures_printed_never_scores(tiny_model_dir, random_sae, tmp_path,
                                                                               capsys, monkeypatch):
    monkeypatch.setenv("EMLENS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    common = ["--model", tiny_model_dir, "--texts", tmp_path / "texts.txt", "--explainer", "openai:canned",
              "--latents", "1,2,3", "--n-test", "4", "--window", "8", "--per-prompt", "2"]
    with CannedEndpoint({"choices": []}) as empty:  # no answer at all: no explanation
        assert run_cli("sae", "explain", random_sae, *common, "--base-url", empty.base_url, "--out",
                       tmp_path / "empty") == 0
    out = capsys.readouterr().out
    scores = pd.read_parquet(tmp_path / "empty" / "scores.parquet")
    explained = scores.status == "no explanation"
    assert explained.sum() == empty.requests > 0 and scores.detection.isna().all() and scores.fuzzing.isna().all()
    assert out.count("explanation: the explainer's answer has no [EXPLANATION]: line") == empty.requests

    # an explanation, and then the same words where a list of labels is due: every scorer prompt a failure
    words = {"choices": [{"message": {"role": "assistant", "content": "[EXPLANATION]: Cats."}}]}
    with CannedEndpoint(words) as chatty:
        assert run_cli("sae", "explain", random_sae, *common, "--base-url", chatty.base_url, "--out",
                       tmp_path / "chatty") == 0
    out = capsys.readouterr().out
    scores = pd.read_parquet(tmp_path / "chatty" / "scores.parquet")
    items = pd.read_parquet(tmp_path / "chatty" / "items.parquet")
    asked = scores[scores.status == "explained"]
    assert len(asked) > 0 and (asked.explanation == "Cats.").all()
    assert asked.detection.isna().all() and (asked.detection_n == 0).all() and (asked.fuzzing_n == 0).all()
    assert (asked.n_failed == asked.detection_failed + asked.fuzzing_failed).all() and items.prediction.isna().all()
    assert chatty.requests == len(asked) + items.prompt.nunique()
    assert out.count("the scorer's answer is not a list of") == items.prompt.nunique()


# ---------------------------------------------------------------- bad input: one line


def test_an_sae_of_another_width_or_site_and_labels_of_another_sae_are_one_line(tiny_model_dir, random_sae,
                                                                                 tmp_path, capsys):
    from emlens.sae.explain import explain_latents

    narrow = tmp_path / "narrow-sae"
    save_random_sae(narrow, d_in=32)
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    common = ["--model", tiny_model_dir, "--texts", tmp_path / "texts.txt", "--explainer", f"hf:{tiny_model_dir}"]
    assert "SAE width 32 does not match" in one_line_error(capsys, run_cli(
        "sae", "explain", narrow, "--latents", "0", *common, "--out", tmp_path / "a"))
    assert "not one of the SAE's 128 latents" in one_line_error(capsys, run_cli(
        "sae", "explain", random_sae, "--latents", "3,128", *common, "--out", tmp_path / "b"))
    ranked = tmp_path / "ranked-elsewhere"  # a `sae diff` of an SAE at layer 2
    ranked.mkdir()
    (ranked / "cfg.json").write_text(json.dumps({"kind": "sae_diff", "site": "blocks.2.hook_resid_post"}))
    assert "ranks the latents of an SAE at blocks.2.hook_resid_post" in one_line_error(capsys, run_cli(
        "sae", "explain", random_sae, "--latents", ranked, *common, "--out", tmp_path / "c"))
    unreachable = [*common[:4], "--explainer", "openai:gpt-x", "--base-url", "http://127.0.0.1:9/v1"]
    assert "explainer / scorer openai:gpt-x: cannot reach 127.0.0.1:9" in one_line_error(capsys, run_cli(
        "sae", "explain", random_sae, "--latents", "0", *unreachable, "--out", tmp_path / "e"))
    assert not any((tmp_path / name).exists() for name in "abce")  # nothing half-written

    from emlens.model import load_model
    from emlens.sae.artifact import load_sae

    other = save_random_sae(tmp_path / "other-sae", seed=1)  # same site and width, other weights
    labels_artifact(tmp_path / "labels", load_sae(other), {0: "x"})
    assert "explains another SAE" in one_line_error(capsys, run_cli(
        "sae", "diff", random_sae, "--adapter", "none", "--model", tiny_model_dir, "--labels", tmp_path / "labels",
        "--out", tmp_path / "d"))
    with pytest.raises(EmlensInputError, match="neither latent ids"):
        explain_latents(random_sae, load_model(str(tiny_model_dir), device="cpu"), "twelve", None, texts=TEXTS)


# ---------------------------------------------------------------- the embedded model behind a real server


@pytest.mark.slow
@pytest.mark.server
def test_the_embedded_model_behind_a_real_server_explains_and_scores_a_trained_sae(smol, llama_server, shared_data,
                                                                                    tmp_path):
    """An SAE trained on the embedded model's activations over judged answers and Alpaca instructions (read from
    the shared data); the same model behind llama.cpp's server explains two latents and scores the explanations.
    Every number must come from answers the server really gave: each scorer answer is asked again, raw, and its
    parse must be the items' labels; a re-run sends nothing."""
    import httpx
    import torch

    from emlens.base.io import load_yaml_model
    from emlens.capture.extract import extract_to_store
    from emlens.capture.store import ActivationStore
    from emlens.judges.base import JudgeCache
    from emlens.sae.artifact import load_sae
    from emlens.sae.explain import ExplainConfig, explain_latents, scorer_tokens
    from emlens.sae.explain_prompts import detection_chat, fuzzing_chat, parse_labels
    from emlens.sae.explain_texts import default_sources, read_texts
    from emlens.sae.text_models import EndpointTextModel
    from emlens.sae.train import SAETrainConfig, train_sae

    site = "blocks.6.hook_resid_post"
    items = read_texts(default_sources(), limit=30)
    store = extract_to_store(smol, items, tmp_path / "store", [site], position="all", max_response_tokens=64,
                             progress=False)
    (tmp_path / "sae.yaml").write_text(f"store: {store.folder}\nsite: {site}\nexpansion_factor: 4\nk: 16\n"
                                       "tokens: 8192\nbatch_size: 128\nbuffer_tokens: 4096\nlr: 0.003\ncheckpoints: 0\n")
    train_sae(load_yaml_model(SAETrainConfig, tmp_path / "sae.yaml"), tmp_path / "sae", progress=False)
    loaded = load_sae(tmp_path / "sae")
    firing = (loaded.encode(ActivationStore(store.folder).load(site)) > 0).float().mean(0)
    latents = [int(i) for i in torch.where(firing < 0.2, firing, torch.zeros_like(firing)).argsort(descending=True)[:3]]
    given = {latents[2]: "Python code: imports, function definitions and file handling."}  # scored whatever the
    # explainer writes for the other two (the 135M model often copies the worked example: a counted failure)

    base_url, _ = llama_server
    cache = JudgeCache(tmp_path / "cache.sqlite")
    config = ExplainConfig(n_test=4, per_prompt=2, max_response_tokens=64, limit=30)
    explainer = EndpointTextModel("smollm2", base_url, cache, max_tokens=160)
    scorer = EndpointTextModel("smollm2", base_url, cache, max_tokens=scorer_tokens(config.per_prompt))
    result = explain_latents(loaded, smol, latents, explainer, scorer, texts=items, config=config, explanations=given)
    print("\n" + result.scores.drop(columns="status").to_string())  # the report quotes these
    print(result.failures.to_string())

    scores = result.scores.set_index("latent")
    assert list(scores.index) == latents and scores.status.loc[latents[2]] == "given"
    assert set(scores.status.loc[latents[:2]]) <= {"explained", "no explanation", "too few contexts"}
    assert explainer.requests_sent == (scores.status.loc[latents[:2]] != "too few contexts").sum()
    for latent, row in scores.iterrows():
        for task in ("detection", "fuzzing"):
            if not np.isnan(row[task]):  # a score only from labelled items (detection: of both classes)
                assert row[f"{task}_n"] > 0 and row[f"{task}_ci_low"] <= row[task] <= row[f"{task}_ci_high"]
        failed_prompts = result.failures[(result.failures.latent == latent)
                                         & result.failures.stage.isin(["detection", "fuzzing"])]
        assert row.detection_failed + row.fuzzing_failed == result.items[
            (result.items.latent == latent) & result.items.prediction.isna()].shape[0]
        assert len(failed_prompts) == result.items[(result.items.latent == latent)
                                                   & result.items.prediction.isna()].prompt.nunique()
    # a scorer prompt asked again, raw (each costs a request): the items' labels are what its answer says, or none
    if len(result.items):
        group = result.items[result.items.prompt == result.items.prompt.min()]
        make_chat = detection_chat if group.task.iloc[0] == "detection" else fuzzing_chat
        chat = make_chat(scores.explanation[group.latent.iloc[0]], group.text.tolist())
        raw = httpx.post(f"{base_url}/chat/completions", json=scorer.request_body(json.dumps(chat)), timeout=120)
        found = parse_labels(raw.json()["choices"][0]["message"]["content"], len(group))
        assert group.prediction.tolist() == (found if found is not None else [pd.NA] * len(group))

    sent = explainer.requests_sent + scorer.requests_sent
    again = explain_latents(loaded, smol, latents, explainer, scorer, texts=items, config=config, explanations=given)
    assert explainer.requests_sent + scorer.requests_sent == sent
    pd.testing.assert_frame_equal(again.scores, result.scores)
