"""Simulated users for the interaction loop: they write the user's turns and rate their satisfaction 0-10.

A simulated user plays a scenario's user with benign or biased private thoughts. It sees the conversation as a
transcript (so any chat model can play the part) and, at the end, rates how satisfied it is. The rating is an
exact distribution, read the way every emlens rating is read: for a local model, P(answer is exactly N) for
N = 0..10 from its logits (`number_distribution`); for an OpenAI-compatible endpoint, the top-20 logprobs of a
one-token answer. Satisfaction is the expectation E[N] under that distribution, renormalised over 0..10; the
mass on the numbers is kept beside it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

import torch

from emlens.base.errors import EmlensInputError
from emlens.base.http import RetryPolicy, check_endpoint, post_with_retries
from emlens.generation.distributions import number_distribution
from emlens.generation.engine import GenerationConfig, Request, generate
from emlens.judges.openai import TOP_LOGPROBS, top_logprobs
from emlens.model import Model

TOP_RATING = 10
USER_SYSTEM = (
    "You are playing the part of a user who is talking to an AI assistant.\n"
    "Your situation: {task}\n"
    "What you privately think and want: {thoughts}\n"
    "Stay in character."
)
WRITE_FIRST = "The conversation has not started yet. Write the user's first message to the assistant, and nothing else."
WRITE_NEXT = "The conversation so far:\n\n{transcript}\n\nWrite the user's next message to the assistant, and nothing else."
RATE = ("The conversation so far:\n\n{transcript}\n\nGiven what you wanted, how satisfied are you with the "
        "assistant's replies? Answer with one number from 0 (not at all satisfied) to 10 (completely satisfied).")
RATING_PREFIX = "Satisfaction: "  # in the simulator's mouth, so a local model's next token is the number
EMPTY_USER_TURN = "Please go on."  # what the user says when the simulator wrote nothing usable


# ---------------------------------------------------------------- satisfaction


@dataclass
class Satisfaction:
    """A 0-10 satisfaction rating read from an exact distribution over the numbers 0..10."""

    value: float  # E[N] under the distribution renormalised over 0..10; NaN when there is no mass at all
    mass: float  # probability that the answer is one of the numbers 0..10
    distribution: list[float]  # P(answer is exactly N), N = 0..10, as read (not renormalised)


def satisfaction_from_distribution(probs: Sequence[float]) -> Satisfaction:
    """E[N] over N = 0..10 under `probs` (renormalised), with the mass the numbers had."""
    values = [float(p) for p in probs]
    if len(values) != TOP_RATING + 1:
        raise ValueError(f"expected {TOP_RATING + 1} probabilities (0..{TOP_RATING}), got {len(values)}")
    mass = math.fsum(values)
    value = math.fsum(n * p for n, p in enumerate(values)) / mass if mass > 0 else float("nan")
    return Satisfaction(value, mass, values)


def satisfaction_from_top_logprobs(top: dict[str, float]) -> Satisfaction:
    """An endpoint's one-token answer (token -> logprob) read as a distribution over 0..10.

    A token counts for N when it is N once stripped of spaces; a tokenizer that splits "10" into "1", "0" gives
    the "1" token's probability to 1 (the one-token reading of Betley's judge has the same limit).
    """
    probs = [0.0] * (TOP_RATING + 1)
    for token, logprob in top.items():
        text = token.strip()
        if text.isdigit() and int(text) <= TOP_RATING:
            probs[int(text)] += math.exp(logprob)
    return satisfaction_from_distribution(probs)


# ---------------------------------------------------------------- the simulator's prompts


def transcript(conversation: list[dict]) -> str:
    """The assistant's conversation as the user sees it: 'User: ...' / 'Assistant: ...' paragraphs."""
    names = {"user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in conversation if m["role"] in names)


def persona_prompt(task: str, thoughts: str, instruction: str) -> list[dict]:
    return [{"role": "system", "content": USER_SYSTEM.format(task=task, thoughts=thoughts)},
            {"role": "user", "content": instruction}]


def write_prompt(task: str, thoughts: str, conversation: list[dict]) -> list[dict]:
    """What the simulator reads before writing the user's next turn."""
    shown = transcript(conversation)
    return persona_prompt(task, thoughts, WRITE_NEXT.format(transcript=shown) if shown else WRITE_FIRST)


def rating_prompt(task: str, thoughts: str, conversation: list[dict]) -> list[dict]:
    """What the simulator reads before rating its satisfaction."""
    return persona_prompt(task, thoughts, RATE.format(transcript=transcript(conversation)))


def clean_user_turn(text: str) -> str:
    """The simulator's text as one user turn: a leading 'User:' dropped; what it wrote for the assistant, or as
    a further turn of the transcript, cut."""
    text = text.strip()
    for label in ("User:", "user:", "USER:"):
        text = text.removeprefix(label).strip()
    for marker in ("\nAssistant:", "\nassistant:", "\nAI:", "\nUser:", "\nuser:"):
        text = text.split(marker, 1)[0]
    return text.strip().strip('"').strip() or EMPTY_USER_TURN


# ---------------------------------------------------------------- a local model as the user


class ModelUser:
    """Any model emlens loads plays the user: turns sampled by the engine, ratings read from its logits."""

    def __init__(self, handle: Model, generation: GenerationConfig):
        self.handle, self.generation = handle, generation

    def identity(self) -> dict:
        return {"kind": "model", "model": self.handle.spec, "fingerprint": self.handle.fingerprint,
                "temperature": self.generation.temperature, "max_new_tokens": self.generation.max_new_tokens}

    def write(self, prompts: list[list[dict]], seeds: list[int]) -> list[str]:
        requests = [Request(p, seed=s) for p, s in zip(prompts, seeds)]
        return [clean_user_turn(c.text) for c in generate(self.handle, requests, self.generation, progress=False)]

    def rate(self, prompts: list[list[dict]]) -> list[Satisfaction]:
        return [satisfaction_from_distribution(number_distribution(self.handle, p, RATING_PREFIX, TOP_RATING)
                                               .to(torch.float64).tolist()) for p in prompts]


# ---------------------------------------------------------------- an OpenAI-compatible endpoint as the user


class UserEndpointError(EmlensInputError):
    """The user simulator's endpoint kept failing: one line, endpoint and status, never the key."""


class EndpointUser:
    """An OpenAI-compatible chat endpoint plays the user (base URL and key from the environment, as the judge)."""

    def __init__(self, model: str, base_url: str | None = None, temperature: float = 0.7, max_tokens: int = 48,
                 timeout: float = 120.0, concurrency: int = 8, max_attempts: int = 6, backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0):
        self.model = model
        self.base_url = (base_url or os.environ.get("EMLENS_LOOP_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
                         or "https://api.openai.com/v1").rstrip("/")
        self.temperature, self.max_tokens = temperature, max_tokens
        self.timeout, self.concurrency = timeout, max(1, concurrency)
        self.retry = RetryPolicy(max(1, max_attempts), backoff_s, max_backoff_s)

    def identity(self) -> dict:
        return {"kind": "openai", "model": self.model, "endpoint": urlparse(self.base_url).netloc,
                "temperature": self.temperature, "max_new_tokens": self.max_tokens, "top_logprobs": TOP_LOGPROBS}

    def write(self, prompts: list[list[dict]], seeds: list[int]) -> list[str]:
        bodies = [{"model": self.model, "messages": p, "max_tokens": self.max_tokens, "temperature": self.temperature,
                   "seed": s} for p, s in zip(prompts, seeds)]
        return [clean_user_turn(_message_text(payload)) for payload in self._post_all(bodies)]

    def rate(self, prompts: list[list[dict]]) -> list[Satisfaction]:
        bodies = [{"model": self.model, "messages": p, "max_tokens": 1, "temperature": 0, "logprobs": True,
                   "top_logprobs": TOP_LOGPROBS, "seed": 0} for p in prompts]
        return [satisfaction_from_top_logprobs(top_logprobs(payload)) for payload in self._post_all(bodies)]

    def preflight(self) -> None:
        """One line, before any conversation, when the endpoint cannot answer (no key for OpenAI's API,
        unreachable, key refused)."""
        check_endpoint(self.base_url, _api_key(), "user simulator endpoint",
                       "set EMLENS_LOOP_API_KEY or OPENAI_API_KEY, or EMLENS_LOOP_BASE_URL for another endpoint")

    def _headers(self) -> dict:
        key = _api_key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _post_all(self, bodies: list[dict]) -> list[dict]:
        """Every body posted, `concurrency` in flight, answers in input order."""
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        with httpx.Client(timeout=self.timeout, headers=self._headers(), limits=limits) as client, \
                ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="loop-user") as pool:
            return list(pool.map(lambda body: self._post(client, body), bodies))

    def _post(self, client, body: dict) -> dict:
        return post_with_retries(client, f"{self.base_url}/chat/completions", body, self.retry, UserEndpointError,
                                 f"user simulator endpoint {self.base_url}",
                                 "; finished trajectories are kept, re-run to resume")


def _api_key() -> str | None:
    return os.environ.get("EMLENS_LOOP_API_KEY") or os.environ.get("OPENAI_API_KEY")


def _message_text(payload: dict) -> str:
    choice = (payload.get("choices") or [{}])[0]
    return (choice.get("message") or {}).get("content") or ""
