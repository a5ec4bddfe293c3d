"""The models that explain and score SAE latents: chats in, written answers out, each answer cached.

- `openai:MODEL`: any OpenAI-compatible endpoint through the judge's own client (`OpenAIJudge`): its retries,
  `concurrency` requests in flight, its preflight and its SQLite cache (`JudgeCache`), each answer cached the
  moment it arrives, so an interrupted run pays only for what is missing.
- `hf:SPEC` / `vllm:SPEC`: a local model through emlens's generation engine (greedy, in batches); `hf:SPEC`
  takes vLLM where `auto` would.

The cache key is the model's id (endpoint or weights fingerprint, decoding) with the whole conversation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

from tqdm import tqdm

from emlens.base.errors import EmlensInputError
from emlens.base.http import check_endpoint
from emlens.generation.engine import GenerationConfig, Request, generate, resolve_engine
from emlens.judges.base import Judge, JudgeCache
from emlens.judges.openai import DEFAULT_CONCURRENCY, KEY_HINT, OpenAIJudge, _api_key, message_texts
from emlens.judges.preflight import check_model_spec
from emlens.model import Model, load_model


@dataclass
class Text:
    """One written answer (what the cache stores)."""

    text: str


def chat_prompt(messages: Sequence[dict]) -> str:
    """A conversation as the one string the cache keys on."""
    return json.dumps(list(messages), ensure_ascii=False, sort_keys=True)


class EndpointTextModel(OpenAIJudge):
    """An OpenAI-compatible endpoint answering whole conversations, greedy, with the judge's client and cache."""

    def __init__(self, model: str, base_url: str | None = None, cache: JudgeCache | None = None,
                 max_tokens: int = 256, concurrency: int = DEFAULT_CONCURRENCY, timeout: float = 120.0):
        super().__init__(model=model, base_url=base_url, cache=cache, mode="verbal", temperature=0.0,
                         max_tokens=max_tokens, concurrency=concurrency, timeout=timeout)
        self.id = f"openai-text|{self.base_url}|{model}|t0|max{max_tokens}"

    def identity(self) -> dict:
        return {"id": self.id, "kind": "openai", "model": self.model, "endpoint": urlparse(self.base_url).netloc,
                "temperature": 0.0, "max_tokens": self.max_tokens}

    def preflight(self) -> None:
        """One line, before any work, when the endpoint cannot answer (unreachable, no key for OpenAI, key refused)."""
        check_endpoint(self.base_url, _api_key(), f"explainer / scorer openai:{self.model}", KEY_HINT)

    def request_body(self, prompt: str, seed: int = 0, n: int | None = None) -> dict:
        return {**super().request_body(prompt, seed, n), "messages": json.loads(prompt)}

    def result_from_payload(self, payload: dict, choices=None) -> Text:
        return Text(message_texts(payload)[0])

    def answer(self, chats: Sequence[Sequence[dict]], progress: bool = False) -> list[str]:
        return answers(self, chats, lambda todo: self._results(todo, None), progress)


class LocalTextModel(Judge):
    """A local model answering whole conversations through emlens's generation engine, greedy, in batches."""

    def __init__(self, handle: Model, cache: JudgeCache | None = None, max_tokens: int = 256, batch_size: int = 8,
                 engine: str = "auto"):
        super().__init__(cache)
        self.handle = handle
        self.engine = resolve_engine(handle, engine)
        self.config = GenerationConfig(max_new_tokens=max_tokens, temperature=0.0, batch_size=batch_size,
                                       engine=self.engine)
        self.id = f"local-text|{handle.fingerprint}|{self.engine}|t0|max{max_tokens}"
        self.requests_sent = 0  # conversations generated (tests read it: a cached re-run sends none)

    def identity(self) -> dict:
        return {"id": self.id, "kind": "hf", "model": self.handle.spec, "engine": self.engine,
                "temperature": 0.0, "max_tokens": self.config.max_new_tokens}

    def answer(self, chats: Sequence[Sequence[dict]], progress: bool = False) -> list[str]:
        return answers(self, chats, self._generated, progress)

    def _generated(self, prompts: list[str]) -> Iterator[tuple[int, Text]]:
        """(position, answer) batch by batch, so each batch is cached as soon as it is written."""
        size = self.config.batch_size
        for start in range(0, len(prompts), size):
            part = prompts[start:start + size]
            self.requests_sent += len(part)
            completions = generate(self.handle, [Request(json.loads(p)) for p in part], self.config, progress=False)
            for offset, completion in enumerate(completions):
                yield start + offset, Text(completion.text)


TextModel = EndpointTextModel | LocalTextModel


def answers(reader: Judge, chats: Sequence[Sequence[dict]], compute, progress: bool) -> list[str]:
    """The reader's answers to `chats`, from its cache where it holds them (`Judge._cached`), in order."""
    prompts = [chat_prompt(chat) for chat in chats]

    def counted(todo: list[str]):
        return tqdm(compute(todo), total=len(todo), desc="autointerp", unit="request", disable=not progress)

    return [found.text for found in reader._cached(reader.id, prompts, counted, Text)]


KINDS = ("openai", "hf", "vllm")


def make_text_model(spec: str, cache: JudgeCache | None, max_tokens: int, base_url: str | None = None,
                    device: str = "auto", loaded: Model | None = None, preflight: bool = True) -> TextModel:
    """`openai:MODEL` (base URL from `base_url`, else EMLENS_JUDGE_BASE_URL / OPENAI_BASE_URL, else OpenAI's API),
    `hf:SPEC` or `vllm:SPEC`; `loaded` is reused when it is the model SPEC names."""
    kind, _, name = spec.partition(":")
    if kind not in KINDS or not name:
        raise EmlensInputError(f"explainer / scorer '{spec}': expected openai:MODEL, hf:SPEC or vllm:SPEC")
    if kind == "openai":
        reader = EndpointTextModel(name, base_url, cache, max_tokens)
        if preflight:
            reader.preflight()
        return reader
    if loaded is not None and loaded.spec == name:
        handle = loaded
    else:
        if preflight:
            check_model_spec(name)
        handle = load_model(name, device=device)
    return LocalTextModel(handle, cache, max_tokens, engine="vllm" if kind == "vllm" else "auto")
