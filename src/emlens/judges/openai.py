"""An OpenAI-compatible endpoint as judge, read the Betley way."""

from __future__ import annotations

import os

from emlens.base.errors import EmlensInputError
from emlens.judges.base import (
    Choice,
    Judge,
    JudgeCache,
    Score,
    choice_from_top_logprobs,
    score_from_top_logprobs,
)


class OpenAIJudge(Judge):
    """An OpenAI-compatible chat endpoint read the Betley way. Base URL and key come from the environment."""

    def __init__(self, model: str = "gpt-4o-2024-08-06", base_url: str | None = None, cache: JudgeCache | None = None,
                 timeout: float = 120.0):
        super().__init__(cache)
        self.base_url = (base_url or os.environ.get("EMLENS_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
                         or "https://api.openai.com/v1").rstrip("/")
        self.model = model
        self.timeout = timeout
        self.id = f"openai|{self.base_url}|{model}|top20"

    def _headers(self) -> dict:
        key = os.environ.get("EMLENS_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _score_uncached(self, prompts: list[str]) -> list[Score]:
        return [score_from_top_logprobs(top) for top in self._first_token_logprobs(prompts)]

    def _choose_uncached(self, prompts: list[str], choices: tuple[str, ...]) -> list[Choice]:
        return [choice_from_top_logprobs(top, choices) for top in self._first_token_logprobs(prompts)]

    def _first_token_logprobs(self, prompts: list[str]) -> list[dict[str, float]]:
        """The top-20 logprobs of the one-token answer to each prompt."""
        import httpx

        tops = []
        with httpx.Client(timeout=self.timeout, headers=self._headers()) as client:
            for prompt in prompts:
                body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1,
                        "temperature": 0, "logprobs": True, "top_logprobs": 20, "seed": 0}
                response = client.post(f"{self.base_url}/chat/completions", json=body)
                if response.status_code != 200:
                    # the body may echo the request, never the key: only the status and the URL are shown
                    raise EmlensInputError(f"judge endpoint {self.base_url}: HTTP {response.status_code}")
                tops.append(_top_logprobs(response.json()))
        return tops


def _top_logprobs(payload: dict) -> dict[str, float]:
    content = payload["choices"][0].get("logprobs", {}).get("content") or []
    if not content:
        return {}
    return {entry["token"]: entry["logprob"] for entry in content[0].get("top_logprobs", [])}
