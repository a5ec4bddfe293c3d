"""The typer app, the options every command shares, and the commands `models` and `generate`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from emlens.base.errors import EmlensInputError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(help="emlens: mechanistic study of emergent misalignment.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
bench_app = typer.Typer(help="Benchmarks that print ratios (last line: key=value pairs).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

def config_option(config: type, field: str, *names: str, help: str | None = None, **kwargs):
    """The option of a config field: None when not given (the YAML's value, else the class default, holds), its
    help the field's description unless given, and `--help` showing the class's real default."""
    default = config.field_default(field)
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    return typer.Option(None, *names, help=help or config.field_description(field) or "",
                        show_default=False if default is None else str(shown).lower() if isinstance(
                            default, bool) else str(shown), **kwargs)


def _eval_option(field: str, *names: str, **kwargs):
    from emlens.evaluation.config import EvalConfig

    return config_option(EvalConfig, field, *names, **kwargs)


# Options default to None: a value not given is left to the API (the config classes own every default).
MODEL_OPT = typer.Option(None, "--model", "-m",
                         help="embedded name, HF id or local folder (default: the embedded model, see `emlens models`)")
ADAPTER_OPT = typer.Option(None, "--adapter", "-a", help="PEFT adapter folder or RUN@STEP")
DEVICE_OPT = typer.Option(None, "--device", help="auto (the default: CUDA if present), cpu, cuda, cuda:1, ..., or "
                                                 "shard (split the model across all visible GPUs)")
ENGINE_OPT = _eval_option("engine", "--engine", help="who samples: auto (vLLM for a model on a GPU where it is "
                                                    "installed, else hf), hf, vllm")
TP_OPT = typer.Option(None, "--tensor-parallel-size", min=1, help="GPUs vLLM shards the model across")
JUDGE_MODEL_OPT = typer.Option(None, "--judge-model", help="endpoint model name or HF model spec")
JUDGE_CONCURRENCY_OPT = _eval_option("judge_concurrency", "--judge-concurrency", min=1)
JUDGE_MODE_OPT = _eval_option("judge_mode", "--judge-mode", help="how an openai judge's answer is read: logprobs "
                              "(Betley), sampled (mean of k answers), verbal (one written answer, for reasoning "
                              "models without logprobs)")
JUDGE_ENGINE_OPT = _eval_option("judge_engine", "--judge-engine", help="who reads an hf judge's score distribution: "
                                "auto (vLLM for a judge on a GPU where it is installed), hf (exact, one prompt at a "
                                "time), vllm (top-20, batched)")
JUDGE_SAMPLES_OPT = _eval_option("judge_samples", "--judge-samples", min=1,
                                 help="answers per prompt in the sampled mode")


def given(**options) -> dict:
    """The options the user gave (not None), to pass on as keyword arguments; the API's defaults fill the rest."""
    return {name: value for name, value in options.items() if value is not None}


def parse_fractions(text: Optional[str], option: str = "--ratios", example: str = "0,0.01,0.05"
                    ) -> Optional[list[float]]:
    """A comma-separated list of fractions given to `option` (None: not given)."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise EmlensInputError(f"option '{option}': expected comma-separated fractions like {example}, "
                               f"got '{text}'") from None


def model_name(model: Optional[str]) -> str:
    """--model, else the API's default model."""
    from emlens.model import DEFAULT_MODEL

    return model or DEFAULT_MODEL


def quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load(model: Optional[str], adapter: Optional[str], device: Optional[str], dtype: Optional[str] = None,
         merge: bool = False, tensor_parallel_size: Optional[int] = None):
    from emlens.model import load_model

    quiet_libraries()
    use_vllm_options(tensor_parallel_size)
    return load_model(**given(spec=model, adapter=adapter, device=device, dtype=dtype), merge=merge)


def use_vllm_options(tensor_parallel_size: Optional[int]) -> None:
    if tensor_parallel_size is not None:
        from emlens.generation.vllm_engine import set_vllm_options

        set_vllm_options(tensor_parallel_size=tensor_parallel_size)


@app.command("models")
def models_command() -> None:
    """List the embedded and cached models with their fingerprints."""
    from emlens.model import list_models

    for row in list_models():
        typer.echo(f"{row['name']:<28} {row['kind']:<9} fingerprint={row['fingerprint'] or '-':<17} "
                   f"source={row['source']}")


@app.command("generate")
def generate_command(
    out: Path = typer.Option(..., "--out", "-o", help="run folder (re-run the same command to resume)"),
    questions: str = typer.Option("betley-first-plot", "--questions", "-q", help="bundled set name or file"),
    nudge: list[str] = typer.Option(["none"], "--nudge", "-n", help="repeatable: none, evil, hhh or a name in --nudges"),
    nudges_file: Optional[Path] = typer.Option(None, "--nudges", help="YAML of user-defined nudges"),
    samples: Optional[int] = typer.Option(None, "--samples", "-s", min=1, help="samples per paraphrase and nudge"),
    limit: Optional[int] = typer.Option(None, "--limit", help="first N questions only"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 = greedy"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    model: Optional[str] = MODEL_OPT, adapter: Optional[str] = ADAPTER_OPT, device: Optional[str] = DEVICE_OPT,
    engine: Optional[str] = ENGINE_OPT, tensor_parallel_size: Optional[int] = TP_OPT,
) -> None:
    """Sample answers to a question set under nudges into OUT/samples.parquet."""
    from emlens.base.io import validate
    from emlens.data.nudges import resolve_nudges
    from emlens.data.questions import read_questions
    from emlens.generation.engine import GenerationConfig
    from emlens.generation.sampling import generate_table

    qs = read_questions(questions, limit=limit)
    ns = resolve_nudges(nudge, nudges_file)
    config = validate(GenerationConfig, given(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                              batch_size=batch_size, engine=engine), "command line")
    handle = load(model, adapter, device, tensor_parallel_size=tensor_parallel_size)
    table = generate_table(handle, qs, ns, out, config=config, **given(samples=samples, seed=seed),
                           command_config={"questions_source": questions, "model": handle.spec, "adapter": adapter})
    per_paraphrase = int(table.sample_index.max()) + 1 if len(table) else 0
    typer.echo(f"wrote {out / 'samples.parquet'}: {len(table)} samples "
               f"({len(qs)} questions x {len(ns)} nudges x {per_paraphrase} samples per paraphrase)")


@bench_app.command("generate")
def bench_generate_command(
    batches: str = typer.Option("1,8,32", "--batches", help="comma-separated batch sizes"),
    new_tokens: int = typer.Option(64, "--new-tokens"),
    hf_baseline: bool = typer.Option(False, "--hf-baseline", help="also time plain HF generate "
                                                                   "(engine_vs_hf_generate_*)"),
    engine: str = typer.Option("hf", "--engine", help="vllm: also time the vllm engine (vllm_vs_hf)"),
    repeats: Optional[int] = typer.Option(None, "--repeats", min=1, help="interleaved runs of each; the best counts"),
    long_prompts: bool = typer.Option(False, "--long-prompts", help="questions/s of a batch of 8 over one at a time "
                                                                    "on prompts of ~1,500 tokens (batched_vs_serial_long)"),
    prompt_tokens: int = typer.Option(1500, "--prompt-tokens", min=32, help="--long-prompts: tokens per prompt"),
    model: Optional[str] = MODEL_OPT, device: Optional[str] = DEVICE_OPT, tensor_parallel_size: Optional[int] = TP_OPT,
) -> None:
    """Tokens/s of the engines at several batch sizes (greedy and sampled), and their ratios."""
    from emlens.bench.generate import bench_generate, bench_long_prompts

    handle = load(model, None, device, tensor_parallel_size=tensor_parallel_size)
    if long_prompts:
        bench_long_prompts(handle, tokens=prompt_tokens, new_tokens=new_tokens, echo=typer.echo, **given(repeats=repeats))
        return
    sizes = [int(b) for b in batches.split(",")]
    bench_generate(handle, sizes, new_tokens, hf_baseline=hf_baseline, engine=engine, echo=typer.echo,
                   **given(repeats=repeats))


@bench_app.command("load")
def bench_load_command(model: Optional[str] = MODEL_OPT) -> None:
    """Seconds to load a model from the emlens cache (target for the embedded model: under 3 s)."""
    from emlens.bench.generate import bench_load

    quiet_libraries()
    bench_load(model_name(model), echo=typer.echo)
