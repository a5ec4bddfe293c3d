"""A local causal LM as judge: the distribution over the numbers 0-100 and the verdicts CODE / REFUSAL."""

from __future__ import annotations

from emlens.generation.distributions import (
    TOP_LOGPROBS,
    choice_distribution,
    number_and_choice_distribution,
    topk_number_and_choice_distributions,
)
from emlens.generation.engine import resolve_engine
from emlens.generation.engines import ENGINES
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

VLLM_BATCH = 256  # judge prompts per vLLM call: each is cached as soon as its batch is read


class HFJudge(Judge):
    """A local causal LM as judge: the probability of each number 0-100 and of each verdict (or of each choice)
    as the whole answer, read by the same rule as the OpenAI judge's logprobs (a verdict wins when it is more
    probable than all the numbers together).

    Engine `hf` reads the exact distribution from the full logits, one prompt at a time. Engine `vllm` reads it
    from vLLM's top-20 next-token logprobs, batched, following every number prefix with probability >= 1e-4: a
    token outside the top 20 counts as 0, so its scores are the exact ones to within that tail (another judge id,
    so the two never share cached scores). `auto` takes vLLM for a judge model on a GPU where vLLM can serve it.
    """

    def __init__(self, handle: Model, cache: JudgeCache | None = None, batch_size: int = 4, engine: str = "hf"):
        super().__init__(cache)
        self.handle = handle
        self.batch_size = batch_size
        self.engine = resolve_engine(handle, engine)
        reading = f"|vllm-top{TOP_LOGPROBS}" if self.engine == "vllm" else ""
        self.id = f"hf|{handle.fingerprint}|numbers0-100+verdicts{reading}"

    def identity(self) -> dict:
        return {"id": self.id, "kind": "hf", "model": self.handle.spec, "engine": self.engine}

    def _score_results(self, prompts: list[str]):
        if self.engine == "hf":
            yield from enumerate(self._score_uncached(prompts))
            return
        engine = ENGINES[self.engine]  # the registry's engine: its top-k next-token logprobs, batched
        for start in range(0, len(prompts), VLLM_BATCH):
            chats = [[{"role": "user", "content": p}] for p in prompts[start:start + VLLM_BATCH]]
            numbers, verdicts = topk_number_and_choice_distributions(
                self.handle, chats, VERDICTS, lambda seqs: engine.logprobs(self.handle, seqs, TOP_LOGPROBS))
            for offset, (n, v) in enumerate(zip(numbers, verdicts, strict=True)):
                yield start + offset, _score(n, v)

    def _score_uncached(self, prompts: list[str]) -> list[Score]:
        messages = [[{"role": "user", "content": p}] for p in prompts]
        return number_scores(self.handle, messages)

    def _choose_uncached(self, prompts: list[str], choices: tuple[str, ...]) -> list[Choice]:
        choice_probs = (choice_distribution(self.handle, [{"role": "user", "content": p}], choices) for p in prompts)
        return [aggregate_choice_probs(dict(zip(choices, map(float, probs), strict=False))) for probs in choice_probs]


def _score(numbers, verdicts) -> Score:
    return aggregate_number_probs({n: float(p) for n, p in enumerate(numbers)},
                                  verdict_probs=dict(zip(VERDICTS, map(float, verdicts), strict=True)))


def number_scores(handle: Model, conversations: list[list[dict]]) -> list[Score]:
    return [_score(*number_and_choice_distribution(handle, messages, VERDICTS)) for messages in conversations]
