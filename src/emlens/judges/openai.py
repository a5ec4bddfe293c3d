"""An OpenAI-compatible endpoint as judge, read the Betley way, at the scale of a real study.

- Up to `concurrency` requests in flight (default 16); results come back in input order, and each one is
  cached the moment it arrives (see `Judge._cached`), so an interrupted run loses nothing already paid for.
- Faults: 429, 5xx, timeouts and dropped connections are retried with exponential backoff and full jitter,
  honouring `Retry-After`, up to `max_attempts`; then the run stops with one line naming the endpoint and the
  status (never the key), every finished score kept, and a re-run resumes. Other 4xx are not retried.
- The same request bodies go into OpenAI Batch API files (`emlens judge export` / `import`).

Scoring modes (`mode`):
- `logprobs` (default): one token, top-20 logprobs, the Betley reading.
- `sampled`: k answers at temperature 1 (`n=k` in one request; an endpoint that returns fewer choices is asked
  again with other seeds), the score is the mean of the parsed numbers and the k readings are kept.
- `verbal`: one written answer, for reasoning models that return no logprobs: its final number 0-100 or verdict
  (`emlens.judges.verbal`). An answer with nothing parsable is unparsed, never 0.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Literal
from urllib.parse import urlparse

from emlens.base.errors import EmlensInputError
from emlens.base.http import RetryPolicy, check_endpoint, post_with_retries
from emlens.judges.base import (
    Choice,
    Judge,
    JudgeCache,
    Score,
    choice_from_top_logprobs,
    score_from_top_logprobs,
)
from emlens.judges.verbal import sampled_score, texts_choice, verbal_score

TOP_LOGPROBS = 20
DEFAULT_CONCURRENCY = 16
KEY_HINT = "set EMLENS_JUDGE_API_KEY or OPENAI_API_KEY, or EMLENS_JUDGE_BASE_URL for another endpoint"
Mode = Literal["logprobs", "sampled", "verbal"]
MODES = ("logprobs", "sampled", "verbal")
DEFAULT_SAMPLES = 5
MODE_TOKENS = {"logprobs": 1, "sampled": 8, "verbal": 1024}  # a reasoning model writes before it scores
MODE_TEMPERATURE = {"logprobs": 0, "sampled": 1.0, "verbal": 0.0}


class JudgeEndpointError(EmlensInputError):
    """The endpoint kept failing (or refused a request outright): one line, endpoint and status, never the key."""


class OpenAIJudge(Judge):
    """An OpenAI-compatible chat endpoint read the Betley way. Base URL and key come from the environment."""

    def __init__(self, model: str = "gpt-4o-2024-08-06", base_url: str | None = None, cache: JudgeCache | None = None,
                 timeout: float = 120.0, concurrency: int = DEFAULT_CONCURRENCY, max_attempts: int = 6,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0, mode: Mode = "logprobs",
                 samples: int = DEFAULT_SAMPLES, temperature: float | None = None, max_tokens: int | None = None):
        super().__init__(cache)
        if mode not in MODES:
            raise EmlensInputError(f"judge mode '{mode}': unknown (expected {', '.join(MODES)})")
        if samples < 1:
            raise EmlensInputError(f"judge samples {samples}: at least 1")
        self.base_url = (base_url or os.environ.get("EMLENS_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
                         or "https://api.openai.com/v1").rstrip("/")
        self.model, self.mode = model, mode
        self.samples = samples if mode == "sampled" else 1
        self.temperature = MODE_TEMPERATURE[mode] if temperature is None else temperature
        self.max_tokens = MODE_TOKENS[mode] if max_tokens is None else max_tokens
        self.timeout, self.concurrency = timeout, max(1, concurrency)
        self.retry = RetryPolicy(max(1, max_attempts), backoff_s, max_backoff_s)
        reading = {"logprobs": "top20", "sampled": f"sampled{self.samples}", "verbal": "verbal"}[mode]
        tail = "" if mode == "logprobs" else f"|t{self.temperature:g}|max{self.max_tokens}"
        self.id = f"openai|{self.base_url}|{model}|{reading}{tail}"  # logprobs keeps the id its cache was built on
        self.requests_sent = 0  # attempts, retries included (benchmarks and tests read it)
        self._count_lock = threading.Lock()

    def identity(self) -> dict:
        found = {"id": self.id, "kind": "openai", "model": self.model, "endpoint": urlparse(self.base_url).netloc,
                 "temperature": self.temperature, "seed": 0}
        if self.mode == "logprobs":
            return {**found, "top_logprobs": TOP_LOGPROBS}
        return {**found, "mode": self.mode, "samples": self.samples, "max_tokens": self.max_tokens}

    def request_body(self, prompt: str, seed: int = 0, n: int | None = None) -> dict:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "seed": seed,
                "temperature": self.temperature}
        if self.mode == "logprobs":
            return {**body, "max_tokens": 1, "logprobs": True, "top_logprobs": TOP_LOGPROBS}
        # OpenAI's reasoning models take only max_completion_tokens; other servers know max_tokens
        limit = "max_completion_tokens" if urlparse(self.base_url).netloc == "api.openai.com" else "max_tokens"
        body[limit] = self.max_tokens
        if self.mode == "sampled":
            body["n"] = self.samples if n is None else n
        return body

    def result_from_payload(self, payload: dict, choices: tuple[str, ...] | None) -> Score | Choice:
        """One answer (a response body, live or from a batch file) read in this judge's mode."""
        if self.mode == "logprobs":
            top = top_logprobs(payload)
            return score_from_top_logprobs(top) if choices is None else choice_from_top_logprobs(top, choices)
        return self._read_texts(message_texts(payload), choices)

    def _read_texts(self, texts: list[str], choices: tuple[str, ...] | None) -> Score | Choice:
        if choices is not None:
            return texts_choice(texts, choices)
        return verbal_score(texts[0]) if self.mode == "verbal" else sampled_score(texts)

    def preflight(self) -> None:
        """One line, before any work, when the endpoint cannot answer (no key for OpenAI's API, unreachable, key
        refused)."""
        check_endpoint(self.base_url, _api_key(), "judge openai", KEY_HINT)

    def _headers(self) -> dict:
        key = _api_key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _score_results(self, prompts: list[str]) -> Iterator[tuple[int, Score]]:
        return self._results(prompts, None)

    def _choose_results(self, prompts: list[str], choices: tuple[str, ...]) -> Iterator[tuple[int, Choice]]:
        return self._results(prompts, choices)

    def _answer(self, client, prompt: str, choices: tuple[str, ...] | None) -> Score | Choice:
        """One prompt's result; in sampled mode, asked again with other seeds until k answers are in."""
        payload = self._post(client, self.request_body(prompt))
        if self.mode != "sampled":
            return self.result_from_payload(payload, choices)
        texts = message_texts(payload)[:self.samples]
        for seed in range(1, self.samples + 1):
            if len(texts) >= self.samples:
                break
            texts += message_texts(self._post(client, self.request_body(prompt, seed, self.samples - len(texts))))
        return self._read_texts(texts[:self.samples], choices)

    def _results(self, prompts: list[str], choices: tuple[str, ...] | None) -> Iterator[tuple[int, Score | Choice]]:
        """(position, result) as each prompt finishes, `concurrency` prompts at a time."""
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        with httpx.Client(timeout=self.timeout, headers=self._headers(), limits=limits) as client, \
                ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge") as pool:
            waiting = iter(enumerate(prompts))
            running: dict[Future, int] = {}

            def submit_next() -> None:
                for position, prompt in waiting:
                    running[pool.submit(self._answer, client, prompt, choices)] = position
                    return

            for _ in range(self.concurrency):
                submit_next()
            failure = None
            try:
                while running:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        position = running.pop(future)
                        try:
                            result = future.result()
                        except JudgeEndpointError as error:
                            failure = failure or error  # send nothing more; keep what is in flight
                            continue
                        yield position, result
                        if failure is None:
                            submit_next()
            finally:
                for future in running:
                    future.cancel()
            if failure is not None:
                raise failure

    def _post(self, client, body: dict) -> dict:
        """One request with retries; raises JudgeEndpointError when it cannot get an answer."""
        return post_with_retries(client, f"{self.base_url}/chat/completions", body, self.retry,
                                 JudgeEndpointError, f"judge endpoint {self.base_url}",
                                 "; finished scores are cached, re-run to resume", on_attempt=self._count_attempt)

    def _count_attempt(self) -> None:
        with self._count_lock:
            self.requests_sent += 1


def _api_key() -> str | None:
    return os.environ.get("EMLENS_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")


def message_texts(payload: dict) -> list[str]:
    """The text of every choice of a chat completion (an empty string for a choice without content)."""
    return [((c or {}).get("message") or {}).get("content") or "" for c in payload.get("choices") or []] or [""]


def top_logprobs(payload: dict) -> dict[str, float]:
    content = (payload.get("choices") or [{}])[0].get("logprobs", {}) or {}
    content = content.get("content") or []
    if not content:
        return {}
    return {entry["token"]: entry["logprob"] for entry in content[0].get("top_logprobs", [])}
