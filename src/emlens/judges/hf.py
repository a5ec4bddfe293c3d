"""A local causal LM as judge: the exact distribution over the numbers 0-100 and the verdicts CODE / REFUSAL."""

from __future__ import annotations

from emlens.generation.distributions import choice_distribution, number_and_choice_distribution
from emlens.judges.base import (
    VERDICTS,
    Choice,
    Judge,
    JudgeCache,
    Score,
    aggregate_choice_probs,
    aggregate_number_probs,
)
from emlens.model import Model


class HFJudge(Judge):
    """A local causal LM as judge: the exact probability of each number 0-100 and of each verdict (or of each choice)
    as the whole answer, read by the same rule as the OpenAI judge's logprobs (a verdict wins when it is more
    probable than all the numbers together)."""

    def __init__(self, handle: Model, cache: JudgeCache | None = None, batch_size: int = 4):
        super().__init__(cache)
        self.handle = handle
        self.batch_size = batch_size
        self.id = f"hf|{handle.fingerprint}|numbers0-100+verdicts"

    def _score_uncached(self, prompts: list[str]) -> list[Score]:
        messages = [[{"role": "user", "content": p}] for p in prompts]
        return number_scores(self.handle, messages)

    def _choose_uncached(self, prompts: list[str], choices: tuple[str, ...]) -> list[Choice]:
        choice_probs = (choice_distribution(self.handle, [{"role": "user", "content": p}], choices) for p in prompts)
        return [aggregate_choice_probs(dict(zip(choices, map(float, probs), strict=False))) for probs in choice_probs]


def number_scores(handle: Model, conversations: list[list[dict]]) -> list[Score]:
    scores = []
    for messages in conversations:
        numbers, verdicts = number_and_choice_distribution(handle, messages, VERDICTS)
        scores.append(aggregate_number_probs({n: float(p) for n, p in enumerate(numbers)},
                                             verdict_probs=dict(zip(VERDICTS, map(float, verdicts), strict=True))))
    return scores
