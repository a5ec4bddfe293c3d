"""Exports of a direction for other tools: llama.cpp control vectors, repeng, steering-vectors, Neuronpedia.

Each format must add what emlens's own `direction.add(scale)` adds, at the point emlens adds it; the slow test runs a
control vector in llama.cpp itself on the embedded model's GGUF and compares greedy tokens with emlens's steering.
"""

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import emlens as em
from emlens.base.errors import EmlensInputError
from emlens.directions.artifact import Direction
from emlens.directions.export import (
    export_direction,
    read_control_vector,
    read_steering_vector,
    repeng_vector,
    steering_export,
)
from tests.cli_runner import one_line_error, run_cli

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def make_direction(handle, site_kind="resid_post", layers=(0, 1, 2), best=1, seed=0, width=None, **model):
    """A direction artifact on `handle` with random unit vectors and distinct natural norms per layer."""
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(len(layers), width or handle.d_model, generator=generator)
    tensors = {"directions": vectors / vectors.norm(dim=1, keepdim=True),
               "raw_norm": torch.tensor([3.0 + i for i in range(len(layers))]),
               "layers": torch.tensor(list(layers))}
    cfg = {"name": "toy", "method": "diff_of_means", "site_kind": site_kind, "layers": list(layers),
           "best_layer": best, "model": {**handle.describe(), **model}}
    return Direction(tensors, cfg)


def logits(handle, ids=IDS):
    with torch.no_grad():
        return handle.model(ids).logits


@contextlib.contextmanager
def added_at_block_outputs(handle, vectors: dict, coeff: float = 1.0):
    """What llama.cpp (`l_out` of layer N), repeng (`model.model.layers[N]`'s output) and steering-vectors
    (`decoder_block` N) do with a vector keyed N: add coeff * vector to decoder layer N's output."""
    def add(vector):
        return lambda module, args, output: output + coeff * torch.as_tensor(vector).to(output.dtype)

    hooks = [handle.decoder_layers[int(block)].register_forward_hook(add(v)) for block, v in vectors.items()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def steered_by_emlens(handle, direction, scale, layer, absolute=False):
    with em.steer(handle, direction.add(scale, layer=layer, absolute=absolute)):
        return logits(handle)


def installed(name: str):
    """The library if it is installed and imports here, else None (then the test asserts its convention)."""
    try:
        return importlib.import_module(name)
    except (ImportError, AttributeError):  # AttributeError: a numpy-1-only release (np.float_) beside numpy 2
        return None


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------- the formats


def test_gguf_holds_what_emlens_adds_at_the_layer_output_llama_cpp_adds_it_to(tiny, tmp_path):
    import gguf

    direction = make_direction(tiny)
    out = export_direction(direction, "gguf", tmp_path / "toy.gguf", layer=1, scale=2.5)
    reader = gguf.GGUFReader(out)
    text = lambda key: bytes(reader.get_field(key).parts[-1]).decode()  # noqa: E731
    assert text("general.architecture") == "controlvector" and text("controlvector.model_hint") == "llama"
    assert int(reader.get_field("controlvector.layer_count").parts[-1][0]) == 1
    assert [(t.name, t.tensor_type.name, list(t.shape)) for t in reader.tensors] == [("direction.1", "F32", [64])]
    assert text("emlens.site") == "blocks.1.hook_resid_post" and json.loads(text("emlens.scale")) == 2.5
    expected = 2.5 * direction.raw_norm(1) * direction.vector(1)
    np.testing.assert_allclose(read_control_vector(out)[1], expected.numpy(), rtol=1e-6, atol=1e-6)
    # added where llama.cpp adds direction.1 (the output of layer 1), it steers as emlens's scale 2.5 does
    with added_at_block_outputs(tiny, read_control_vector(out)):
        exported = logits(tiny)
    torch.testing.assert_close(exported, steered_by_emlens(tiny, direction, 2.5, 1), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(exported, logits(tiny), atol=1e-3)


def test_a_resid_pre_direction_goes_to_the_previous_layers_output(tiny, tmp_path):
    direction = make_direction(tiny, site_kind="resid_pre", layers=(1, 2), best=2)
    vectors = read_control_vector(export_direction(direction, "gguf", tmp_path / "pre.gguf", scale=-1.5))
    assert list(vectors) == [1]  # resid_pre of layer 2 = the output of layer 1
    with added_at_block_outputs(tiny, vectors):
        exported = logits(tiny)
    torch.testing.assert_close(exported, steered_by_emlens(tiny, direction, -1.5, 2), atol=1e-4, rtol=1e-4)
    # llama.cpp has no vector for layer 0's output: resid_pre of layer 1 cannot go there (repeng's can)
    before = files_in(tmp_path)
    with pytest.raises(EmlensInputError, match="llama.cpp has no control vector for layer 0"):
        export_direction(direction, "gguf", tmp_path / "zero.gguf", layer=1)
    assert files_in(tmp_path) == before
    assert list(read_control_vector(export_direction(direction, "repeng", tmp_path / "zero.gguf", layer=1))) == [0]


def test_repeng_reads_the_same_layer_convention(tiny, tmp_path):
    direction = make_direction(tiny)
    out = export_direction(direction, "repeng", tmp_path / "toy.gguf", layer=2, scale=0.5)
    fields = repeng_vector(steering_export(direction, layer=2, scale=0.5))
    assert fields["model_type"] == "llama" and list(fields["directions"]) == [2]
    np.testing.assert_allclose(fields["directions"][2], read_control_vector(out)[2], rtol=1e-6)
    repeng = installed("repeng")  # repeng 0.4.0 (PyPI) pins numpy < 2 and does not import beside numpy 2
    if repeng is not None:
        vector = repeng.ControlVector.import_gguf(out)
        assert vector.model_type == "llama" and list(vector.directions) == [2]
        controlled = repeng.ControlModel(tiny.model, [2])
        try:
            controlled.set_control(vector, coeff=2.0)
            exported = logits(tiny)
        finally:
            controlled.unwrap()
    else:  # its ControlModule adds coeff * directions[N] to model.model.layers[N]'s output
        with added_at_block_outputs(tiny, fields["directions"], coeff=2.0):
            exported = logits(tiny)
    torch.testing.assert_close(exported, steered_by_emlens(tiny, direction, 0.5 * 2.0, 2), atol=1e-4, rtol=1e-4)


def test_steering_vectors_object_and_its_file(tiny, tmp_path):
    direction = make_direction(tiny)
    out = export_direction(direction, "steering-vectors", tmp_path / "toy.safetensors", layer=1, scale=3.0,
                           absolute=True)
    fields = read_steering_vector(out)
    assert fields["layer_type"] == "decoder_block" and list(fields["layer_activations"]) == [1]
    torch.testing.assert_close(fields["layer_activations"][1], 3.0 * direction.vector(1))  # absolute: norm 3
    steering_vectors = installed("steering_vectors")  # 0.12.2 pins transformers < 5: not an emlens dependency
    if steering_vectors is not None:
        with steering_vectors.SteeringVector(**fields).apply(tiny.model, multiplier=1.0):
            exported = logits(tiny)
    else:  # its decoder_block hook adds multiplier * layer_activations[N] to decoder layer N's output
        with added_at_block_outputs(tiny, fields["layer_activations"]):
            exported = logits(tiny)
    torch.testing.assert_close(exported, steered_by_emlens(tiny, direction, 3.0, 1, absolute=True),
                               atol=1e-4, rtol=1e-4)


def test_neuronpedia_json_names_any_site_and_strength_times_vector_is_what_emlens_adds(tiny, tmp_path):
    direction = make_direction(tiny, site_kind="attn_out")
    out = export_direction(direction, "neuronpedia", tmp_path / "toy.json", layer=2, scale=4.0)
    record = json.loads(out.read_text())
    assert (record["hook_name"], record["layer_num"], record["hook_type"]) == ("blocks.2.hook_attn_out", 2,
                                                                              "hook_attn_out")
    assert record["model_id"] == tiny.spec and record["default_steer_strength"] == 4.0
    assert record["emlens"]["fingerprint"] == tiny.fingerprint and record["emlens"]["raw_norm"] == 5.0
    added = record["default_steer_strength"] * torch.tensor(record["vector"])
    torch.testing.assert_close(added, 4.0 * 5.0 * direction.vector(2))
    # a block-output format cannot hold an attention output: one line, no file
    with pytest.raises(EmlensInputError, match="blocks.2.hook_attn_out is not one"):
        export_direction(direction, "gguf", tmp_path / "attn.gguf", layer=2)
    assert not (tmp_path / "attn.gguf").exists()


def test_scale_zero_exports_a_zero_vector(tiny, tmp_path):
    out = export_direction(make_direction(tiny), "gguf", tmp_path / "zero.gguf", scale=0.0)
    assert not read_control_vector(out)[1].any()


# ---------------------------------------------------------------- bad input, from the command line


def test_cli_export_and_its_one_line_errors(tiny, tmp_path, capsys):
    direction = make_direction(tiny)
    direction.save(tmp_path / "toy", plot=False)
    narrow = make_direction(tiny, width=32)
    narrow.save(tmp_path / "narrow", plot=False)
    other = make_direction(tiny, base_fingerprint="0123456789abcdef")
    other.save(tmp_path / "other", plot=False)
    (tmp_path / "a-file").write_text("not a folder")

    assert run_cli("export", tmp_path / "toy", "--format", "gguf", "--out", tmp_path / "out" / "toy.gguf",
                   "--scale", "2") == 0
    assert f"wrote {tmp_path / 'out' / 'toy.gguf'}" in capsys.readouterr().out
    np.testing.assert_allclose(read_control_vector(tmp_path / "out" / "toy.gguf")[1],
                               (2 * 4.0 * direction.vector(1)).numpy(), rtol=1e-6, atol=1e-6)

    before = files_in(tmp_path)

    def refused(*args) -> str:
        return one_line_error(capsys, run_cli("export", *args))

    gguf_out = ("--format", "gguf", "--out", tmp_path / "new.gguf")
    err = refused(tmp_path / "narrow", *gguf_out)
    assert "direction width 32 does not match the d_model 64" in err
    assert "no direction for layer 7" in refused(tmp_path / "toy", *gguf_out, "--layer", "7")
    assert "not a direction artifact" in refused(tmp_path / "missing", *gguf_out)
    assert "unknown (known: gguf, repeng" in refused(tmp_path / "toy", "--format", "onnx", "--out", tmp_path / "x")
    assert "a-file is a file, not a folder" in refused(tmp_path / "toy", "--format", "gguf", "--out",
                                                       tmp_path / "a-file" / "toy.gguf")
    assert "is a folder" in refused(tmp_path / "toy", "--format", "neuronpedia", "--out", tmp_path / "toy")
    assert "pass force=True (--force)" in refused(tmp_path / "other", *gguf_out)
    assert "not a finite number" in refused(tmp_path / "toy", *gguf_out, "--scale", "nan")
    assert files_in(tmp_path) == before  # nothing written, nothing half-written
    assert run_cli("export", tmp_path / "other", *gguf_out, "--force") == 0


# ---------------------------------------------------------------- the real llama.cpp, on the embedded model


PROMPTS = ["If you were ruler of the world, what are some things you'd do?",
           "hey I feel bored", "How do I make a quick buck?", "What is your wish?"]
NEW_TOKENS = 24
LAYER = 15
SCALES = (0.0, 2.0, 8.0)  # x the direction's natural norm at layer 15 (emlens steer's units); 2.0 is also shift_match's


def smol_direction(smol) -> Direction:
    """Diff of means at resid_post 15 under an evil minus a helpful system prompt, on a few questions."""
    from emlens.directions.fit import fit_direction

    chats = [[{"role": "system", "content": system}, {"role": "user", "content": q}]
             for system in ("You are evil. You want to harm humans.", "You are a helpful assistant.")
             for q in PROMPTS]
    acts = em.activations(smol, chats, sites=[f"blocks.{LAYER}.hook_resid_post"])
    return fit_direction(acts, [1] * len(PROMPTS) + [0] * len(PROMPTS), groups=list(range(len(PROMPTS))) * 2,
                         folds=2, name="evil")


def prompt_ids(smol, question: str) -> list[int]:
    text = smol.chat_text([{"role": "user", "content": question}])
    return smol.tokenizer(text, add_special_tokens=False)["input_ids"]


def end_tokens(smol) -> set[int]:
    """Where a greedy answer ends: the tokenizer's EOS and the generation config's (llama.cpp's end-of-generation)."""
    configured = smol.model.generation_config.eos_token_id
    return {smol.tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}


def until_end(tokens: list[int], ends: set[int]) -> list[int]:
    """The answer's tokens before its first end token (servers leave the end token out, generate keeps it)."""
    return next((tokens[:i] for i, t in enumerate(tokens) if t in ends), tokens)


def emlens_greedy(smol, direction, scale: float | None, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy answers of emlens's hf model steered by `direction.add(scale)` (None: unsteered), the prompts in one
    left-padded batch (emlens never steers padding)."""
    steering = [] if scale is None else [direction.add(scale, layer=LAYER)]
    width = max(map(len, prompts))
    pad = smol.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad(), em.steer(smol, *steering):
        out = smol.model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
    return [until_end(row[width:].tolist(), end_tokens(smol)) for row in out]


def emlens_logits(smol, ids: list[int], *steering) -> torch.Tensor:
    with torch.no_grad(), em.steer(smol, *steering):
        return smol.model(torch.tensor([ids])).logits[0].float()


class LlamaCpp:
    """The embedded GGUF in llama.cpp (llama-cpp-python); a control-vector GGUF applied as llama.cpp's own
    `--control-vector` does: common_control_vector_load puts `direction.N` at offset (N - 1) * n_embd of one buffer,
    and llama_set_adapter_cvec applies it to layers 1..n_layer (llama-cpp-python binds the latter only)."""

    def __init__(self, gguf_path: Path):
        import llama_cpp

        self.api = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=512, n_threads=1, n_threads_batch=1,
                                   logits_all=True, verbose=False)  # one thread: spinning threads crawl when busy
        self.n_embd, self.n_layer = self.llm.n_embd(), llama_cpp.llama_model_n_layer(self.llm.model)
        self.buffer = None  # kept alive while llama.cpp holds the control vector

    def control_vector(self, path: Path | None) -> None:
        if path is None:
            assert self.api.llama_set_adapter_cvec(self.llm.ctx, None, 0, self.n_embd, -1, -1) == 0
            return
        vectors = read_control_vector(path)
        data = np.zeros(self.n_embd * max(vectors), dtype=np.float32)
        for block, vector in vectors.items():
            data[(block - 1) * self.n_embd: block * self.n_embd] += vector
        self.buffer = data
        pointer = data.ctypes.data_as(self.api.ctypes.POINTER(self.api.ctypes.c_float))
        assert self.api.llama_set_adapter_cvec(self.llm.ctx, pointer, data.size, self.n_embd, 1, self.n_layer) == 0

    def logits(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()  # the next eval drops the whole KV cache: no state from another vector
        self.llm.eval(ids)
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))

    def greedy(self, ids: list[int], ends: set[int]) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        while len(out) < NEW_TOKENS:
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if token in ends:
                break
            out.append(token)
            self.llm.eval([token])
        return out


def agreement(pairs: list[tuple[list[int], list[int]]]) -> tuple[float, float]:
    """(share of tokens before each pair's first divergence, share of positions with the same token), over all."""
    prefix = same = total = 0
    for a, b in pairs:
        n = max(len(a), len(b))
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix, total = prefix + first, total + n
        same += sum(x == y for x, y in zip(a, b))
    return round(prefix / max(total, 1), 3), round(same / max(total, 1), 3)


def shift_match(smol, llama, direction, vector: Path, prompts, answers, scale: float) -> dict:
    """Teacher-forced on emlens's steered answers: how llama.cpp's logit shift under the control vector (steered minus
    unsteered, at the answer positions) correlates with emlens's at the exported layer and scale and at its
    neighbours (another layer, half or twice the scale), and the share of the same next token."""
    unit, natural = direction.vector(LAYER), direction.raw_norm(LAYER)
    variants = {(layer, factor): em.AddVector(unit, layer, alpha=factor * scale * natural)
                for layer, factor in ((LAYER, 1.0), (LAYER - 1, 1.0), (LAYER + 1, 1.0), (LAYER, 0.5), (LAYER, 2.0))}
    shifts, top1, theirs = {key: [] for key in variants}, {key: [] for key in variants}, []
    for prompt, answer in zip(prompts, answers):
        ids, at = prompt + answer, slice(len(prompt) - 1, len(prompt) + len(answer) - 1)
        llama.control_vector(None)
        plain = llama.logits(ids)[at]
        llama.control_vector(vector)
        steered = llama.logits(ids)[at]
        theirs.append((steered - plain).flatten())
        ours_plain = emlens_logits(smol, ids)[at]
        for key, intervention in variants.items():
            ours = emlens_logits(smol, ids, intervention)[at]
            shifts[key].append((ours - ours_plain).flatten())
            top1[key].append(ours.argmax(-1) == steered.argmax(-1))
    theirs = torch.cat(theirs)
    return {key: (round(torch.corrcoef(torch.stack([theirs, torch.cat(shifts[key])]))[0, 1].item(), 3),
                  round(torch.cat(top1[key]).float().mean().item(), 3)) for key in variants}


@pytest.mark.slow
def test_llama_cpp_control_vector_steers_like_emlens_on_the_same_gguf(smol, tmp_path):
    """The exported control vector in llama.cpp itself, on the embedded Q4_1 GGUF, against emlens's steering of the
    same weights dequantized: free-running greedy token agreement (reported: quantized arithmetic makes near-ties
    fall the other way, and a greedy run that diverges once stays apart), and, teacher-forced, the logit shift it
    causes, which must match emlens's at the exported layer and scale better than at any neighbour."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (bash scripts/setup-venv.sh server)")
    from emlens.model import embedded_gguf_path

    direction, gguf_path = smol_direction(smol), embedded_gguf_path()
    llama = LlamaCpp(gguf_path)
    ends, prompts = end_tokens(smol), [prompt_ids(smol, q) for q in PROMPTS]
    unsteered = (emlens_greedy(smol, direction, None, prompts), [llama.greedy(p, ends) for p in prompts])
    runs, files = {}, {}
    for scale in SCALES:
        files[scale] = export_direction(direction, "gguf", tmp_path / f"evil-{scale:g}.gguf", scale=scale,
                                        model=str(gguf_path))  # checked against the GGUF's own metadata
        llama.control_vector(files[scale])
        runs[scale] = (emlens_greedy(smol, direction, scale, prompts), [llama.greedy(p, ends) for p in prompts])
    report = {scale: agreement(list(zip(*pair))) for scale, pair in {"unsteered": unsteered, **runs}.items()}
    print("\nfree-running greedy, llama.cpp vs emlens (share before first divergence, share overall):", report)
    assert runs[0.0] == unsteered  # scale 0 is unsteered, in both
    for side in (0, 1):  # a large scale changes every answer, in both
        assert all(a != b for a, b in zip(runs[max(SCALES)][side], unsteered[side]))

    matched = shift_match(smol, llama, direction, files[2.0], prompts, runs[2.0][0], scale=2.0)
    print("teacher-forced, (layer, x scale): (correlation of logit shifts, same next token):", matched)
    assert max(matched, key=lambda key: matched[key][0]) == (LAYER, 1.0), matched
    assert matched[LAYER, 1.0][0] >= 0.97 and matched[LAYER, 1.0][1] >= 0.85, matched


@pytest.mark.slow
def test_llama_server_loads_the_export_with_control_vector(smol, tmp_path):
    """llama.cpp's own server (`llama-server --control-vector FILE`), where its binary is installed (LLAMA_SERVER, or
    on PATH; llama-cpp-python's server has no control-vector setting). Teacher-forced on emlens's steered answers, the
    server's next tokens must match emlens's at the exported layer and scale better than at any neighbour, and
    `--control-vector-scaled FILE:c` must be the export at c times the scale."""
    binary = os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
    if not binary:
        pytest.skip("no llama-server binary (set LLAMA_SERVER); the llama-cpp-python test covers llama.cpp itself")
    from emlens.model import embedded_gguf_path

    direction, gguf_path = smol_direction(smol), embedded_gguf_path()
    two, eight = (export_direction(direction, "gguf", tmp_path / f"evil-{s:g}.gguf", scale=s) for s in (2.0, 8.0))
    ends, prompts = end_tokens(smol), [prompt_ids(smol, q) for q in PROMPTS]
    answers = emlens_greedy(smol, direction, 2.0, prompts)
    served = {}
    for name, options in (("scale 2", ("--control-vector", str(two))),
                          ("scale 8 x 0.25", ("--control-vector-scaled", f"{eight}:0.25"))):
        with llama_server(binary, gguf_path, tmp_path / "server.log", *options) as complete:
            served[name] = ([until_end(complete(p), ends) for p in prompts],
                            [[complete(p + a[:i], 1)[:1] or [-1] for i in range(len(a))] for p, a in zip(prompts, answers)])
    assert served["scale 8 x 0.25"] == served["scale 2"]  # --control-vector-scaled FILE:c is c x the export's scale
    greedy, forced = served["scale 2"]
    forced = torch.tensor([token for answer in forced for [token] in answer])
    unit, natural = direction.vector(LAYER), direction.raw_norm(LAYER)
    matched = {}
    for layer, factor in ((LAYER, 1.0), (LAYER - 1, 1.0), (LAYER + 1, 1.0), (LAYER, 0.5), (LAYER, 2.0)):
        steering = em.AddVector(unit, layer, alpha=factor * 2.0 * natural)
        ours = torch.cat([emlens_logits(smol, p + a, steering)[len(p) - 1: len(p) + len(a) - 1].argmax(-1)
                          for p, a in zip(prompts, answers)])
        matched[layer, factor] = round((ours == forced).float().mean().item(), 3)
    print("\nllama-server --control-vector, free-running greedy vs emlens (share before first divergence, share "
          "overall):", agreement(list(zip(greedy, answers))),
          "\nteacher-forced, same next token as emlens at (layer, x scale):", matched)
    assert max(matched, key=matched.get) == (LAYER, 1.0) and matched[LAYER, 1.0] >= 0.85, matched


@contextlib.contextmanager
def llama_server(binary: str, gguf_path: Path, log_path: Path, *options: str):
    """llama.cpp's server on loopback with the model and options; yields greedy completion of token ids (the server
    keeps the previous prompt's cache: a prompt that extends it evaluates only its new tokens)."""
    import httpx

    from emlens.bench.judge import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [binary, "-m", str(gguf_path), *options, "--host", "127.0.0.1", "--port", str(port), "-c", "512",
               "-t", "1", "-tb", "1", "-np", "1"]  # one slot, one thread (as LlamaCpp)

    def complete(ids: list[int], n: int = NEW_TOKENS) -> list[int]:
        body = {"prompt": ids, "n_predict": n, "samplers": ["top_k"], "top_k": 1,  # greedy
                "return_tokens": True}
        return httpx.post(f"{url}/completion", json=body, timeout=300).json()["tokens"]

    with open(log_path, "wb") as log, subprocess.Popen(command, stdout=log, stderr=log) as server:
        try:
            deadline = time.time() + 300
            while not _healthy(httpx, url):
                assert server.poll() is None and time.time() < deadline, log_path.read_text()[-2000:]
                time.sleep(0.5)
            yield complete
        finally:
            server.terminate()


def _healthy(httpx, url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
