"""The OpenAI-compatible HTTP API of `emlens serve`: FastAPI routes on uvicorn, over one batching model thread.

Routes: `GET /v1/models`, `GET /v1/emlens` (what may be steered with: registered directions and SAEs with their
fingerprints), `POST /v1/chat/completions` and `POST /v1/completions` (streaming and not, n, temperature,
top_p, max_tokens, seed, logprobs / top_logprobs, stop). Every response carries an `emlens` field saying what
was applied (each op with its direction's fingerprint, layer, site, scale and alpha; the engine; the model and
adapter), so a client can check that steering happened. A stream sends each token's text as it is generated
(OpenAI-style chunks whose text adds up to the whole), and a stop string ends its request in the engine.

Every refusal is an OpenAI-style JSON error naming the field (`param`), with status 400 (401 for a missing or
wrong key, 404 for an unknown model, 500 for a fault of the server, whose traceback goes to the server's log,
never to the client); the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from emlens.base.errors import EmlensInputError
from emlens.generation.engine import GenerationConfig, Request
from emlens.generation.requests import Completion, TokenLogprob, eos_token_ids, prompt_token_ids
from emlens.model import DEFAULT_MODEL, Model
from emlens.serve.config import API_KEY_ENV, ServeConfig
from emlens.serve.protocol import ChatRequest, CompletionRequest, ServeError, error_param
from emlens.serve.server import Served, Server, load_server

log = logging.getLogger(__name__)


@dataclass
class Choice:
    """One finished completion as the API returns it: text cut at a stop string, its log-probs and counts."""

    text: str
    finish_reason: str  # stop | length
    logprobs: list[TokenLogprob] | None
    generated: int  # tokens generated (usage)
    prompt_tokens: int


class Watch:
    """One choice as it is generated, called from the model thread with each token: the text so far, cut at the
    first stop string (which ends the request there), and, when streaming, the text sent on in whole characters,
    holding back a tail that may begin a stop string. A client that leaves cancels it: the request ends at its
    next token."""

    def __init__(self, handle, stops: list[str], send=None):
        self.handle, self.stops, self.send = handle, stops, send
        self.ids: list[int] = []
        self.entries: list[TokenLogprob] = []
        self.text, self.sent, self.entries_sent = "", 0, 0
        self.stopped = self.cancelled = False

    def __call__(self, token: int, entry: TokenLogprob | None) -> bool:
        self.ids.append(token)
        if entry is not None:
            self.entries.append(entry)
        if self.cancelled:
            return True
        text = self.handle.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # inside a UTF-8 character: wait for the rest of it
            return False
        cuts = [text.find(s) for s in self.stops if s in text]
        self.text, self.stopped = (text[:min(cuts)], True) if cuts else (text, False)
        self.pass_on(len(self.text) - (0 if cuts else self._held(text)))
        return self.stopped

    def _held(self, text: str) -> int:
        """How many characters at the end may begin a stop string."""
        return max((k for stop in self.stops for k in range(min(len(stop) - 1, len(text)), 0, -1)
                    if text.endswith(stop[:k])), default=0)

    def pass_on(self, upto: int | None = None) -> None:
        upto = len(self.text) if upto is None else upto
        if self.send is not None and (upto > self.sent or len(self.entries) > self.entries_sent):
            self.send(self.text[self.sent:upto], self.entries[self.entries_sent:])
            self.sent, self.entries_sent = max(self.sent, upto), len(self.entries)

    def finish(self, completion: Completion) -> Choice:
        """The choice the API returns; a stream's held-back tail is sent on."""
        ids = completion.token_ids
        text_tokens = len(ids) - bool(ids and ids[-1] in eos_token_ids(self.handle))  # an end-of-sequence has none
        self.text = self.text if self.stopped else completion.text
        logprobs = None if completion.logprobs is None else completion.logprobs[:text_tokens]
        self.entries = logprobs or []
        self.pass_on()
        return Choice(self.text, "length" if completion.finish_reason == "length" else "stop", logprobs, len(ids),
                      completion.prompt_tokens)


def token_text(handle, token: int) -> str:
    return handle.tokenizer.decode([token])


def chat_logprobs(handle, entries: list[TokenLogprob] | None) -> dict | None:
    if entries is None:
        return None

    def item(token: int, logprob: float) -> dict:
        text = token_text(handle, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top.items()]}
                        for e in entries]}


def completion_logprobs(handle, entries: list[TokenLogprob] | None) -> dict | None:
    if entries is None:
        return None
    tokens = [token_text(handle, e.token) for e in entries]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(handle, t): lp for t, lp in e.top.items()} for e in entries],
            "text_offset": offsets}


class Guard:
    """ASGI middleware before any route: the bearer key (when EMLENS_API_KEY is set) and the body-size limit.
    The body is read whole (it is at most the limit) and handed on, so an oversize one is refused before any
    route parses it."""

    def __init__(self, app, key: str | None, max_body_bytes: int):
        self.app, self.key, self.max_body = app, key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key and not hmac.compare_digest(headers.get(b"authorization", b""), f"Bearer {self.key}".encode()):
            return await _send_error(send, ServeError("missing or wrong API key (send Authorization: Bearer KEY)",
                                                      status=401, code="invalid_api_key"))
        too_big = ServeError(f"request body exceeds the limit of {self.max_body} bytes", "body")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return await _send_error(send, too_big)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await _send_error(send, too_big)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _send_error(send, error: ServeError) -> None:
    payload = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def build_app(server: Server) -> FastAPI:
    app = FastAPI(title="emlens serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, error: RequestValidationError):
        first = error.errors()[0]
        param = error_param(tuple(first.get("loc", ())))
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return _json_error(ServeError(f"{param}: {message}" if param else message, param))

    @app.exception_handler(ServeError)
    async def _refused(_request, error: ServeError):
        return _json_error(error)

    @app.exception_handler(Exception)
    async def _fault(_request, error: Exception):
        log.exception("emlens serve: request failed")
        return _json_error(ServeError(f"internal error: {type(error).__name__}", status=500, kind="server_error"))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "emlens",
                                            "emlens": served.describe()} for name, served in server.models.items()]}

    @app.get("/v1/emlens")
    async def steering():
        return {"engine": server.config.engine, "models": {n: s.describe() for n, s in server.models.items()},
                **server.registered.describe()}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        return await _respond(_submit(server, body, [(body.chat(), None)]), body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await _respond(_submit(server, body, [([], p) for p in body.prompts()]), body, chat=False)

    app.add_middleware(Guard, key=os.environ.get(API_KEY_ENV) or None, max_body_bytes=server.config.max_body_bytes)
    return app


def _json_error(error: ServeError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _served(server: Server, name: str) -> Served:
    if name not in server.models:
        raise ServeError(f"model '{name}' is not served (served: {', '.join(server.models)})", "model", status=404,
                         code="model_not_found")
    return server.models[name]


def _token_limit(server: Server, body, served: Served, prompts: list[Request]) -> int:
    limit, config = body.token_limit, server.config
    if limit is not None and limit > config.max_tokens:
        raise ServeError(f"max_tokens {limit} exceeds this server's limit of {config.max_tokens}", "max_tokens")
    longest = max(len(ids) for ids in prompt_token_ids(served.handle, prompts))
    room = server.context - longest if server.context else config.max_tokens
    if room < 1 or (limit is not None and limit > room):
        raise ServeError(f"the prompt ({longest} tokens) and max_tokens {limit} exceed the model's context of "
                         f"{server.context} tokens", "max_tokens" if room >= 1 else "messages")
    return limit if limit is not None else min(config.default_max_tokens, config.max_tokens, room)


@dataclass
class Pending:
    """A request handed to the model thread: its choices' watches, the future of its completions, and (when
    streaming) the queue its pieces arrive on."""

    served: Served
    watches: list[Watch]
    future: Future
    events: asyncio.Queue | None
    extension: dict

    async def choices(self) -> list[Choice]:
        try:
            completions = await asyncio.wrap_future(self.future)
        except EmlensInputError as error:
            raise ServeError(str(error)) from None
        return [watch.finish(c) for watch, c in zip(self.watches, completions, strict=True)]


def _submit(server: Server, body, prompts: list[tuple[list[dict], str | None]]) -> Pending:
    """Check the request, then hand it to the model thread (a refusal is raised before any work starts)."""
    served = _served(server, body.model)
    if body.n > server.config.max_n:
        raise ServeError(f"n {body.n} exceeds this server's limit of {server.config.max_n}", "n")
    interventions, applied = server.steerings.resolve(body.emlens.steer)
    seed = body.seed if body.seed is not None else secrets.randbelow(1 << 31)
    loop = asyncio.get_running_loop()
    events = asyncio.Queue() if body.stream else None

    def sender(index: int):
        return lambda piece, entries: loop.call_soon_threadsafe(events.put_nowait, (index, piece, entries))

    count = len(prompts) * body.n
    watches = [Watch(served.handle, body.stops, sender(i) if events else None) for i in range(count)]
    watched = bool(body.stops) or body.stream  # otherwise nothing needs the tokens before the end
    requests = [Request(messages, seed=seed + i * body.n + j, interventions=interventions, prompt=prompt,
                        logprobs=body.top_k_logprobs, on_token=watches[i * body.n + j] if watched else None)
                for i, (messages, prompt) in enumerate(prompts) for j in range(body.n)]
    max_new_tokens = _token_limit(server, body, served, requests[::body.n])
    if body.min_tokens > max_new_tokens:
        raise ServeError(f"min_tokens {body.min_tokens} exceeds max_tokens {max_new_tokens}", "min_tokens")
    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=body.min_tokens,
                              temperature=body.temperature, top_p=body.top_p, engine=server.config.engine,
                              batch_size=server.config.max_batch)
    extension = {"engine": server.config.engine, "model": served.handle.spec, "adapter": served.adapter,
                 "fingerprint": served.handle.fingerprint, "seed": seed, "steer": applied}
    future = server.batcher.submit(served.handle, requests, config, served.activate)
    return Pending(served, watches, future, events, extension)


async def _respond(pending: Pending, body, chat: bool):
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": pending.served.name}
    if body.stream:
        return StreamingResponse(_stream(pending, body, head, chat), media_type="text/event-stream")
    handle, choices = pending.served.handle, await pending.choices()
    if chat:
        rows = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                 "logprobs": chat_logprobs(handle, c.logprobs)} for i, c in enumerate(choices)]
    else:
        rows = [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                 "logprobs": completion_logprobs(handle, c.logprobs)} for i, c in enumerate(choices)]
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": rows,
            "usage": _usage(choices, body.n), "emlens": pending.extension}


def _usage(choices: list[Choice], n: int) -> dict:
    prompt = sum(c.prompt_tokens for c in choices[::n])  # each prompt once, not once per choice
    generated = sum(c.generated for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


async def _stream(pending: Pending, body, head: dict, chat: bool):
    """Server-sent events as the tokens come: OpenAI-style chunks whose text adds up to the whole."""
    handle, kind = pending.served.handle, "chat.completion.chunk" if chat else "text_completion"

    def event(rows: list[dict], **extra) -> str:
        return f"data: {json.dumps({**head, 'object': kind, 'choices': rows, **extra})}\n\n"

    def piece(index: int, text: str, entries) -> str:
        if chat:
            return event([{"index": index, "delta": {"content": text}, "logprobs": chat_logprobs(handle, entries),
                           "finish_reason": None}])
        return event([{"index": index, "text": text, "logprobs": completion_logprobs(handle, entries),
                       "finish_reason": None}])

    try:
        for index in range(len(pending.watches) if chat else 1):  # the first chunk says what was applied
            yield event([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} if chat else
                         {"index": index, "text": "", "logprobs": None, "finish_reason": None}],
                        **({"emlens": pending.extension} if index == 0 else {}))
        finished = asyncio.ensure_future(pending.choices())
        while True:
            arrived = asyncio.ensure_future(pending.events.get())
            await asyncio.wait({arrived, finished}, return_when=asyncio.FIRST_COMPLETED)
            if not arrived.done():
                arrived.cancel()
                break
            yield piece(*arrived.result())
        try:
            choices = finished.result()
        except ServeError as error:
            yield f"data: {json.dumps(error.body())}\n\n"
            return
        while not pending.events.empty():  # the last pieces, sent on as the choices finished
            yield piece(*pending.events.get_nowait())
        for index, choice in enumerate(choices):
            yield event([{"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.finish_reason}
                         if chat else {"index": index, "text": "", "logprobs": None,
                                       "finish_reason": choice.finish_reason}])
        if (body.stream_options or {}).get("include_usage"):
            yield event([], usage=_usage(choices, body.n))
        yield "data: [DONE]\n\n"
    finally:  # a client that left stops its requests at their next token
        for watch in pending.watches:
            watch.cancelled = True


def run_server(server: Server, echo=print) -> None:
    """Serve in the foreground until interrupted (`emlens serve`)."""
    config = server.config
    echo(f"serving {', '.join(server.models)} on http://{config.host}:{config.port}/v1 (engine {config.engine}; "
         f"directions: {', '.join(server.registered.directions) or 'none'}; "
         f"SAEs: {', '.join(server.registered.saes) or 'none'})")
    try:
        uvicorn.run(build_app(server), host=config.host, port=config.port, log_level="warning")
    finally:
        server.close()


@contextlib.contextmanager
def serving(server: Server, timeout_s: float = 60.0) -> Iterator[str]:
    """Serve on the configured host and port (port 0: a free one) in a background thread; yields the base URL
    (`http://127.0.0.1:PORT/v1`) and stops the server on exit (tests, benchmarks, notebooks)."""
    uv = uvicorn.Server(uvicorn.Config(build_app(server), host=server.config.host, port=server.config.port,
                                       log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, name="emlens-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise EmlensInputError(f"emlens serve: could not start on {server.config.host}:{server.config.port}")
        time.sleep(0.02)
    port = uv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{server.config.host}:{port}/v1"
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def serve_model(model: str | Model = DEFAULT_MODEL, adapters: dict[str, str] | None = None,
          directions: dict[str, str] | None = None, saes: dict[str, str] | None = None, **settings) -> Iterator[str]:
    """`with em.serve_model(model, directions={"evil": PATH}) as base_url:` a model (a spec, or one already loaded) and
    its adapters behind the OpenAI-compatible API on a free loopback port, for the block's duration. `settings`
    are ServeConfig fields (engine, port, max_tokens, ...)."""
    config = ServeConfig(**{"port": 0, **settings})
    handle = model if isinstance(model, Model) else None
    server = load_server(model if handle is None else DEFAULT_MODEL, adapters, directions, saes, config, handle=handle)
    try:
        with serving(server) as base_url:
            yield base_url
    finally:
        server.close()
