"""`emlens serve MODEL`: the model, its adapters and registered directions behind an OpenAI-compatible API."""

from __future__ import annotations

from typing import Optional

import typer

from emlens.cli.app import (
    DEVICE_OPT,
    MODEL_OPT,
    TP_OPT,
    app,
    bench_app,
    config_option,
    given,
    load,
    quiet_libraries,
    use_vllm_options,
)
from emlens.serve.config import ServeConfig


def _option(field: str, *names: str, **kwargs):
    return config_option(ServeConfig, field, *names, **kwargs)


@app.command("serve")
def serve_command(
    model: Optional[str] = typer.Argument(None, help="embedded name, HF id or local folder (default: the embedded "
                                                     "model)"),
    model_option: Optional[str] = typer.Option(None, "--model", "-m", help="the model, as an option"),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", "-a", help="NAME=PATH: serve the model with "
                                                "this adapter as MODEL:NAME (repeatable)"),
    direction: Optional[list[str]] = typer.Option(None, "--direction", help="NAME=PATH: a direction requests may "
                                                  "steer with (repeatable)"),
    sae: Optional[list[str]] = typer.Option(None, "--sae", help="NAME=PATH: an SAE whose latents requests may "
                                            "steer with (repeatable)"),
    name: Optional[str] = typer.Option(None, "--name", help="the model's name in the API (default: the model "
                                                           "spec's last part)"),
    force: bool = typer.Option(False, "--force", help="allow directions fitted on another base model"),
    engine: Optional[str] = _option("engine", "--engine"),
    host: Optional[str] = _option("host", "--host"),
    port: Optional[int] = _option("port", "--port"),
    max_tokens: Optional[int] = _option("max_tokens", "--max-tokens"),
    max_n: Optional[int] = _option("max_n", "--max-n"),
    max_body_bytes: Optional[int] = _option("max_body_bytes", "--max-body-bytes"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16"),
    device: Optional[str] = DEVICE_OPT, tensor_parallel_size: Optional[int] = TP_OPT,
) -> None:
    """Serve MODEL (and MODEL:NAME per adapter) at /v1; requests steer with `{"emlens": {"steer": [...]}}`.

    Binds 127.0.0.1 unless --host says otherwise; set EMLENS_API_KEY to require `Authorization: Bearer KEY`.
    """
    from emlens.serve.app import run_server
    from emlens.serve.server import load_server
    from emlens.serve.steering import parse_named

    config = ServeConfig().with_flags(engine=engine, host=host, port=port, max_tokens=max_tokens, max_n=max_n,
                                      max_body_bytes=max_body_bytes)
    named = {"adapters": parse_named(adapter, "adapter"), "directions": parse_named(direction, "direction"),
             "saes": parse_named(sae, "sae")}
    quiet_libraries()
    use_vllm_options(tensor_parallel_size)
    server = load_server(**given(model=model_option or model, device=device, dtype=dtype, name=name), **named,
                         config=config, force=force)
    run_server(server, echo=typer.echo)


@bench_app.command("serve")
def bench_serve_command(
    engine: str = typer.Option("hf", "--engine", help="hf or vllm"),
    requests: int = typer.Option(16, "--requests", min=1, help="requests per phase"),
    concurrency: int = typer.Option(8, "--concurrency", min=2, help="clients at once in the concurrent phases"),
    new_tokens: int = typer.Option(32, "--new-tokens", min=1, help="tokens every request generates"),
    repeats: int = typer.Option(3, "--repeats", min=1, help="interleaved runs of each; the best counts"),
    model: Optional[str] = MODEL_OPT, device: Optional[str] = DEVICE_OPT, tensor_parallel_size: Optional[int] = TP_OPT,
) -> None:
    """Requests/s through the server at concurrency 1 and N, plain and steered; last line includes
    concurrent_vs_serial and steered_vs_plain."""
    from emlens.bench.serve import bench_serve

    handle = load(model, None, device, tensor_parallel_size=tensor_parallel_size)
    bench_serve(handle, engine=engine, requests=requests, concurrency=concurrency, new_tokens=new_tokens,
                repeats=repeats, echo=typer.echo)
