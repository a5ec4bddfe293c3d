"""Sample questions under nudges into a resumable run table (`emlens generate`, and the first half of eval)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from emlens.data.nudges import Nudge, apply_nudge
from emlens.data.questions import Question, question_messages
from emlens.generation.engine import GenerationConfig, Request, generate, resolve_engine, sample_seed
from emlens.model import Model
from emlens.runs import RunStore

log = logging.getLogger(__name__)

SAMPLE_KEY = ["setting", "question_id", "paraphrase_index", "nudge", "sample_index", "intervention"]


@dataclass
class SampleSpec:
    """One row-to-be: which question, paraphrase, nudge and sample index, with its chat and seed."""

    setting: str
    question: Question
    paraphrase_index: int
    nudge: Nudge
    sample_index: int
    seed: int
    messages: list[dict]
    intervention: str = "none"

    @property
    def key(self) -> tuple:
        return (self.setting, self.question.id, self.paraphrase_index, self.nudge.name, self.sample_index,
                self.intervention)


def expand(questions: Iterable[Question], nudges: Iterable[Nudge], samples: int | None, seed: int,
           setting: str = "free_form", intervention: str = "none") -> list[SampleSpec]:
    """questions x paraphrases x nudges x samples; `samples=None` keeps each question's samples_per_paraphrase."""
    specs = []
    for question in questions:
        n = samples if samples is not None else question.samples_per_paraphrase
        for p in range(len(question.paraphrases)):
            base = question_messages(question, p)
            for nudge in nudges:
                messages = apply_nudge(base, nudge)
                for s in range(n):
                    row_seed = sample_seed(seed, setting, question.id, p, nudge.name, s)
                    specs.append(SampleSpec(setting, question, p, nudge, s, row_seed, messages, intervention))
    return specs


def sample_row(handle: Model, spec: SampleSpec, completion) -> dict:
    return {
        "model": handle.spec,
        "adapter": handle.adapter or "",
        "fingerprint": handle.fingerprint,
        "setting": spec.setting,
        "question_id": spec.question.id,
        "paraphrase_index": spec.paraphrase_index,
        "paraphrase": spec.question.paraphrases[spec.paraphrase_index],
        "nudge": spec.nudge.name,
        "nudge_text": spec.nudge.text,
        "nudge_where": spec.nudge.where,
        "sample_index": spec.sample_index,
        "seed": spec.seed,
        "intervention": spec.intervention,
        "messages": json.dumps(spec.messages, ensure_ascii=False),
        "response": completion.text,
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens,
        "response_tokens": len(completion.token_ids),
    }


def run_samples(handle: Model, specs: list[SampleSpec], store: RunStore, config: GenerationConfig,
                interventions=(), progress: bool = True) -> None:
    """Generate every spec not already in the store, appending each finished batch to it."""
    done = store.done_keys()
    todo = [s for s in specs if s.key not in done]
    if len(todo) < len(specs):
        log.info("resuming: %d of %d samples already done", len(specs) - len(todo), len(specs))
    if not todo:
        return
    requests = [Request(messages=s.messages, seed=s.seed) for s in todo]

    def save(indices, completions):
        store.append(sample_row(handle, todo[i], c) for i, c in zip(indices, completions, strict=False))

    generate(handle, requests, config, interventions=interventions, progress=progress, on_batch=save)


def generate_table(handle: Model, questions: list[Question], nudges: list[Nudge], out: str | Path,
                   samples: int | None = 1, config: GenerationConfig | None = None, seed: int = 0,
                   progress: bool = True, command_config: dict | None = None) -> pd.DataFrame:
    """`emlens generate`: sample every question under every nudge into RUN/samples.parquet (resumable)."""
    config = config or GenerationConfig()
    config = config.model_copy(update={"engine": resolve_engine(handle, config.engine)})  # recorded as it ran
    store = RunStore(out, SAMPLE_KEY)
    store.open({"kind": "generate_run", "model": handle.describe(),
                "config": {**(command_config or {}), "generation": config.model_dump(), "seed": seed,
                           "samples": samples, "nudges": [n.model_dump() for n in nudges],
                           "questions": [q.id for q in questions]}})
    run_samples(handle, expand(questions, nudges, samples, seed), store, config, progress=progress)
    return store.finish()
