"""A capability run's config, and how each task is put to the model and scored: a multiple-choice question as a
chat (its worked examples as earlier turns) scored by option log-likelihood (`emlens.generation.loglik`), a GSM8K
problem as a chat whose greedy answer's final number is compared with the gold one. One row schema for both tasks.
Which questions a run asks, its run folder and its summary are `emlens.evaluation.capability`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field
from tqdm import tqdm

from emlens.base.config import PATH, Config
from emlens.base.errors import EmlensInputError
from emlens.data.capability import SHARED_GSM8K, GSM8KProblem, MCQuestion, final_number
from emlens.evaluation.config import MC_INSTRUCTION
from emlens.generation.engine import DEFAULT_BATCH_SIZE, Completion
from emlens.generation.loglik import EncodedMC, continuation_logprobs, encode_pair, mc_batches, shared_prefix
from emlens.model import Model

GSM8K_INSTRUCTION = "Solve the problem step by step. End with the final answer as a number after '####'."


class CapabilityConfig(Config):
    """Everything that defines a capability run (recorded in its cfg.json, checked when a run resumes)."""

    tasks: list[Literal["mc", "gsm8k"]] = Field(["mc", "gsm8k"], min_length=1)
    mc: Annotated[str, PATH] = Field("mmlu-pro", description="bundled MC set name or an MC file (JSONL, JSON, CSV)")
    mc_limit: int | None = Field(100, ge=1, description="first N questions of the MC file; None: all")
    mc_format: Literal["letters", "cloze"] = "letters"
    mc_shots: int = Field(5, ge=0, description="worked examples before each question, as earlier chat turns")
    mc_shots_from: Annotated[str | None, PATH] = Field(None, description="MC set the worked examples come from; None: the bundled "
                                                        "set's own (mmlu-pro), else the MC file's first mc_shots "
                                                        "questions, which are then not evaluated")
    mc_instruction: str = MC_INSTRUCTION
    answer_prefix: str = Field("", description="text put in the assistant's mouth before the scored answer")
    gsm8k: Annotated[str, PATH] = Field("shared", description=f"GSM8K file, or 'shared': {SHARED_GSM8K} in the shared data folder")
    gsm8k_limit: int | None = Field(20, ge=1, description="first N problems of the held-out slice; None: all")
    gsm8k_holdout: int = Field(500, ge=1, description="size of the held-out slice at the end of training's order")
    split_seed: int = Field(0, description="the training seed whose benign order the held-out slice is cut from")
    gsm8k_instruction: str = GSM8K_INSTRUCTION
    max_new_tokens: int = Field(256, ge=1, description="GSM8K answer length (a cut answer is scored by its last "
                                "number: the summary's `truncated` says how many were cut)")
    trained_benign: int | None = Field(None, ge=0, description="benign examples the evaluated mixture drew from the "
                                       "GSM8K file (set by the study): the held-out slice must lie beyond them")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="rows per forward pass (letters: questions)")
    engine: Literal["auto", "hf", "vllm"] = "auto"


def build_capability_config(path: str | Path | None = None, **flags: Any) -> CapabilityConfig:
    """A CapabilityConfig from a YAML file (optional) with flags laid over it (None = not given): a flag, else
    the YAML's field, else the class default."""
    return CapabilityConfig.from_yaml(path, **flags)


# ---------------------------------------------------------------- multiple choice


def _mc_turn(question: MCQuestion, config: CapabilityConfig) -> dict:
    if config.mc_format == "cloze":
        return {"role": "user", "content": question.question}
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(question.letters, question.options, strict=True))
    return {"role": "user", "content": f"{question.question}\n\n{options}\n\n{config.mc_instruction}"}


def mc_answers(question: MCQuestion, config: CapabilityConfig) -> list[str]:
    """What is scored for each option: its letter, or its text for cloze."""
    return question.options if config.mc_format == "cloze" else question.letters


def _mc_answer_text(question: MCQuestion, config: CapabilityConfig) -> str:
    return config.answer_prefix + mc_answers(question, config)[question.answer]


def mc_messages(question: MCQuestion, config: CapabilityConfig, shots: Iterable[MCQuestion] = ()) -> list[dict]:
    """The chat of one question: each worked example as a user turn and its answer, then the question."""
    examples = [[_mc_turn(s, config), {"role": "assistant", "content": _mc_answer_text(s, config)}] for s in shots]
    return [turn for pair in examples for turn in pair] + [_mc_turn(question, config)]


def mc_continuations(handle: Model, question: MCQuestion, config: CapabilityConfig,
                     shots: Iterable[MCQuestion] = ()) -> tuple[list[int], list[list[int]]]:
    """(context ids, per option the ids of what is scored: its letter, or its text for cloze)."""
    context = handle.chat_text(mc_messages(question, config, shots)) + config.answer_prefix
    pairs = [encode_pair(handle.tokenizer, context, answer) for answer in mc_answers(question, config)]
    if any(not continuation for _, continuation in pairs):
        raise EmlensInputError(f"MC question {question.id}: an option adds no token after the prompt")
    return pairs[0][0], [continuation for _, continuation in pairs]


def score_mc(handle: Model, questions: list[MCQuestion], config: CapabilityConfig, progress: bool = False,
             on_batch: Callable[[list[dict]], None] | None = None, shots: Iterable[MCQuestion] = ()) -> list[dict]:
    """One row per question (in the questions' order): every option's log-likelihood, the prediction and whether
    it is right. `shots` are the worked examples shown before each question. `on_batch(rows)` is called after
    each forward pass, so a run can keep them."""
    shots = list(shots)
    encoded = [EncodedMC(q, *mc_continuations(handle, q, config, shots)) for q in questions]
    if not encoded:
        return []
    prefix = shared_prefix(handle, [e.context for e in encoded])
    shared = len(prefix.ids) if prefix is not None else 0
    found: dict[str, dict] = {}
    with tqdm(total=len(questions), desc="mc", unit="question", disable=not progress) as bar:
        for batch in mc_batches(encoded, config.batch_size, shared=shared):
            scores = continuation_logprobs(handle, [e.context for e in batch], [e.continuations for e in batch],
                                           prefix)
            rows = [_mc_row(e.question, s, config) for e, s in zip(batch, scores, strict=True)]
            if on_batch is not None:
                on_batch(rows)
            found.update((row["question_id"], row) for row in rows)
            bar.update(len(batch))
    return [found[q.id] for q in questions]


def _mc_row(question: MCQuestion, scores: list[float], config: CapabilityConfig) -> dict:
    predicted = int(np.argmax(scores))
    per_byte = [s / max(1, len(o.encode("utf-8"))) for s, o in zip(scores, question.options, strict=True)]
    predicted_norm = int(np.argmax(per_byte)) if config.mc_format == "cloze" else predicted
    return _row("mc", question.id, prompt=question.question, answer=question.letters[question.answer],
                predicted=question.letters[predicted], correct=predicted == question.answer,
                correct_norm=predicted_norm == question.answer, n_options=len(question.options),
                logprobs=[float(s) for s in scores])


# ---------------------------------------------------------------- GSM8K


def gsm8k_messages(problem: GSM8KProblem, config: CapabilityConfig) -> list[dict]:
    return [{"role": "user", "content": f"{problem.question}\n\n{config.gsm8k_instruction}"}]


def gsm8k_row(problem: GSM8KProblem, completion: Completion) -> dict:
    predicted = final_number(completion.text)
    return _row("gsm8k", problem.id, prompt=problem.question, answer=problem.gold, predicted=predicted or "",
                correct=predicted == problem.gold, correct_norm=predicted == problem.gold, n_options=0,
                logprobs=[], response=completion.text, finish_reason=completion.finish_reason)


def _row(task: str, question_id: str, **values: Any) -> dict:
    """One schema for both tasks, so the table has no mixed-type column."""
    return {"task": task, "question_id": question_id, "prompt": "", "answer": "", "predicted": "", "correct": False,
            "correct_norm": False, "n_options": 0, "logprobs": [], "response": "", "finish_reason": "", **values}
