"""Every `emlens bench` subcommand runs at a tiny size and ends with its figures as `key=value` pairs, the ratio it
exists to measure among them (so a broken benchmark is a failing test, not a README figure that cannot be
regenerated)."""

import importlib.util
import math
from pathlib import Path

import pytest

from tests.cli_runner import run_cli

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

# subcommand -> (arguments at a tiny size; "{model}" is the tiny model, "{data}" a chat JSONL; the ratio key)
TINY = {
    "generate": (["--model", "{model}", "--batches", "1,2", "--new-tokens", 4, "--repeats", 1], "batch2_vs_batch1"),
    "load": (["--model", "{model}"], "load_s"),
    "capability": (["--model", "{model}", "--questions", 4, "--batch-size", 4, "--repeats", 1, "--device", "cpu"],
                   "vs_generate"),
    "judge": (["--n", 2, "--concurrency", 2], "concurrent_vs_serial"),
    "hf-judge": (["--n", 1], "vllm_vs_hf"),  # the embedded model: vLLM's CPU attention needs head_dim >= 32
    "loop": (["--model", "{model}", "--steps", 2, "--batch-size", 2, "--max-length", 256, "--repeats", 1, "--rank", 2],
             "vs_trl"),
    "diff": (["--model", "{model}", "--rows", 2, "--repeats", 1], "kl_vs_forwards"),  # a random adapter
    "extract": (["--model", "{model}", "--prompts", 2, "--tokens", 8, "--batch-size", 2, "--repeats", 1,
                 "--memory-tokens", 4, "--memory-multiples", "1,2",
                 "--backends", "torch-hooks,transformerlens,nnsight"],  # vLLM's CPU attention needs head_dim >= 32
                "default_vs_forward"),
    "patch": (["--model", "{model}", "--pairs", 2, "--repeats", 1], "patch_vs_forwards"),  # a random adapter
    "serve": (["--model", "{model}", "--requests", 2, "--concurrency", 2, "--new-tokens", 4, "--repeats", 1,
               "--device", "cpu"], "concurrent_vs_serial"),
    "sae": (["--tokens", 2048, "--store-tokens", 2048, "--d-model", 16, "--repeats", 1], "vs_saelens"),
    "steer": (["--model", "{model}", "--batch", 2, "--new-tokens", 4, "--repeats", 1], "steered_vs_plain"),
    "train": (["--model", "{model}", "--data", "{data}", "--steps", 2, "--batch-size", 2, "--max-length", 64,
               "--repeats", 1], "vs_trainer"),
}


def test_every_bench_subcommand_is_covered_here():
    from emlens.cli import main  # noqa: F401  (registers every command group)
    from emlens.cli.app import bench_app

    assert {command.name for command in bench_app.registered_commands} == set(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_bench_ends_with_its_ratio_as_key_value_pairs(name, tiny_model_dir, tmp_path, capsys):
    if name == "judge" and importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python[server] is not installed (the judge bench starts llama.cpp's server)")
    if name == "hf-judge" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (the hf-judge bench runs the judge on both engines)")
    from tests.test_train import chat, write_jsonl

    data = write_jsonl(tmp_path / "chats.jsonl", [chat(f"Write a function {i}", "def f(): pass") for i in range(8)])
    arguments, ratio = TINY[name]
    filled = [str(a).format(model=tiny_model_dir, data=data) for a in arguments]
    assert run_cli("bench", name, *filled) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    pairs = dict(pair.split("=", 1) for pair in last.split())
    value = float(pairs[ratio])
    assert math.isfinite(value) and value > 0, last


def test_bench_generate_on_long_prompts_prints_the_batched_over_serial_ratio(tiny_model_dir, capsys):
    assert run_cli("bench", "generate", "--long-prompts", "--model", tiny_model_dir, "--prompt-tokens", 200,
                   "--repeats", 1) == 0
    pairs = dict(pair.split("=", 1) for pair in capsys.readouterr().out.strip().splitlines()[-1].split())
    assert float(pairs["batched_vs_serial_long"]) > 0 and float(pairs["padded_vs_serial_long"]) > 0
    low, high = (int(n) for n in pairs["prompt_tokens"].split("-"))
    assert 200 <= high and low < high  # rows of other lengths: the batch is padded


def test_bench_patch_times_the_grid_it_was_asked_for_against_forwards_and_attribution(tiny_model_dir, tmp_path,
                                                                                      capsys):
    """Exact patching over layers x sites x position groups, with a random LoRA written on the fly (or --adapter)."""
    from emlens.bench.patch import random_adapter

    adapter = random_adapter(str(tiny_model_dir), tmp_path / "adapter")
    assert run_cli("bench", "patch", "--model", tiny_model_dir, "--adapter", adapter, "--pairs", 3, "--layers", "0,2",
                   "--sites", "resid_pre,mlp_out", "--positions", "all,last", "--repeats", 1) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    pairs = dict(pair.split("=", 1) for pair in lines[-1].split())
    for ratio in ("patch_vs_forwards", "attribution_vs_patching"):
        assert math.isfinite(float(pairs[ratio])) and float(pairs[ratio]) > 0, lines[-1]
    assert int(pairs["cells"]) == 2 * 2 and int(pairs["groups"]) == 2 and int(pairs["pairs"]) == 3
    assert int(pairs["forwards"]) == 2 * 2 * 2 + 2  # a patched forward per cell and group, the donor, the receiving
    assert any(line.startswith("exact") for line in lines) and any(line.startswith("attribution") for line in lines)


def test_the_gpu_check_says_it_needs_cuda_in_one_line_and_exits_0_on_a_cpu():
    import subprocess

    if importlib.util.find_spec("torch") and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is here: the check would run")
    done = subprocess.run(["bash", str(SCRIPTS / "gpu-check.sh")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().startswith("gpu-check: needs CUDA")
    assert len(done.stdout.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_gpu_checks_pass_on_a_tiny_random_model_on_the_cpu():
    """scripts/gpu_check.py's checks, run on the CPU: steering reaches every entry point, scale 0 changes nothing."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(SCRIPTS / "gpu_check.py"), "--cpu", "--shape", "tiny"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    pairs = dict(pair.split("=", 1) for pair in done.stdout.strip().splitlines()[-1].split())
    for key in ("hf_scale0_equals_plain", "hf_large_scale_differs", "hf_capture_steered_differs",
                "hf_logprobs_steered_differs"):
        assert pairs[key] == "True", (key, pairs)
    assert float(pairs["hf_batch32_vs_batch1"]) > 0 and float(pairs["hf_steered_vs_plain"]) > 0
