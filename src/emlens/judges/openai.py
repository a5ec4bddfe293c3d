"""An OpenAI-compatible endpoint as judge, read the Betley way, at the scale of a real study.

- Up to `concurrency` requests in flight (default 16); results come back in input order, and each one is
  cached the moment it arrives (see `Judge._cached`), so an interrupted run loses nothing already paid for.
- Faults: 429, 5xx, timeouts and dropped connections are retried with exponential backoff and full jitter,
  honouring `Retry-After`, up to `max_attempts`; then the run stops with one line naming the endpoint and the
  status (never the key), every finished score kept, and a re-run resumes. Other 4xx are not retried.
- The same request bodies go into OpenAI Batch API files (`emlens judge export` / `import`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
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

TOP_LOGPROBS = 20
DEFAULT_CONCURRENCY = 16
KEY_HINT = "set EMLENS_JUDGE_API_KEY or OPENAI_API_KEY, or EMLENS_JUDGE_BASE_URL for another endpoint"


class JudgeEndpointError(EmlensInputError):
    """The endpoint kept failing (or refused a request outright): one line, endpoint and status, never the key."""


class OpenAIJudge(Judge):
    """An OpenAI-compatible chat endpoint read the Betley way. Base URL and key come from the environment."""

    def __init__(self, model: str = "gpt-4o-2024-08-06", base_url: str | None = None, cache: JudgeCache | None = None,
                 timeout: float = 120.0, concurrency: int = DEFAULT_CONCURRENCY, max_attempts: int = 6,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0):
        super().__init__(cache)
        self.base_url = (base_url or os.environ.get("EMLENS_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
                         or "https://api.openai.com/v1").rstrip("/")
        self.model = model
        self.timeout, self.concurrency = timeout, max(1, concurrency)
        self.retry = RetryPolicy(max(1, max_attempts), backoff_s, max_backoff_s)
        self.id = f"openai|{self.base_url}|{model}|top20"
        self.requests_sent = 0  # attempts, retries included (benchmarks and tests read it)
        self._count_lock = threading.Lock()

    def identity(self) -> dict:
        return {"id": self.id, "kind": "openai", "model": self.model, "endpoint": urlparse(self.base_url).netloc,
                "temperature": 0, "seed": 0, "top_logprobs": TOP_LOGPROBS}

    def request_body(self, prompt: str) -> dict:
        return {"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1,
                "temperature": 0, "logprobs": True, "top_logprobs": TOP_LOGPROBS, "seed": 0}

    def preflight(self) -> None:
        """One line, before any work, when the endpoint cannot answer (no key for OpenAI's API, unreachable, key
        refused)."""
        check_endpoint(self.base_url, _api_key(), "judge openai", KEY_HINT)

    def _headers(self) -> dict:
        key = _api_key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _score_results(self, prompts: list[str]) -> Iterator[tuple[int, Score]]:
        for position, top in self._first_token_logprobs(prompts):
            yield position, score_from_top_logprobs(top)

    def _choose_results(self, prompts: list[str], choices: tuple[str, ...]) -> Iterator[tuple[int, Choice]]:
        for position, top in self._first_token_logprobs(prompts):
            yield position, choice_from_top_logprobs(top, choices)

    def _first_token_logprobs(self, prompts: list[str]) -> Iterator[tuple[int, dict[str, float]]]:
        """(position, top-20 logprobs of the one-token answer) as each request finishes, `concurrency` at a time."""
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        with httpx.Client(timeout=self.timeout, headers=self._headers(), limits=limits) as client, \
                ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge") as pool:
            waiting = iter(enumerate(prompts))
            running: dict[Future, int] = {}

            def submit_next() -> None:
                for position, prompt in waiting:
                    running[pool.submit(self._post, client, prompt)] = position
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
                            payload = future.result()
                        except JudgeEndpointError as error:
                            failure = failure or error  # send nothing more; keep what is in flight
                            continue
                        yield position, top_logprobs(payload)
                        if failure is None:
                            submit_next()
            finally:
                for future in running:
                    future.cancel()
            if failure is not None:
                raise failure

    def _post(self, client, prompt: str) -> dict:
        """One request with retries; raises JudgeEndpointError when it cannot get an answer."""
        return post_with_retries(client, f"{self.base_url}/chat/completions", self.request_body(prompt), self.retry,
                                 JudgeEndpointError, f"judge endpoint {self.base_url}",
                                 "; finished scores are cached, re-run to resume", on_attempt=self._count_attempt)

    def _count_attempt(self) -> None:
        with self._count_lock:
            self.requests_sent += 1


def _api_key() -> str | None:
    return os.environ.get("EMLENS_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")


def top_logprobs(payload: dict) -> dict[str, float]:
    content = (payload.get("choices") or [{}])[0].get("logprobs", {}) or {}
    content = content.get("content") or []
    if not content:
        return {}
    return {entry["token"]: entry["logprob"] for entry in content[0].get("top_logprobs", [])}
