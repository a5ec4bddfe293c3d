"""`emlens bench capability`: multiple-choice questions per second by option log-likelihood (all options of a
batch of questions in one forward pass) against generating an answer per question with the engine.

Generation baselines, same prompts, greedy, hf engine:
- `vs_generate`: generating ONE token per question, the answer letter, in the engine's batches of `batch_size`
  (the cheapest generation can be, and enough for a model that starts its answer with the letter, as the
  embedded model does). Scoring differs only in its batches, which hold at most 10 % padding;
- `vs_generate_per_question`: the same one letter, generated one question at a time (no padding at all). One
  letter costs one forward pass over the prompt, like scoring, so this ratio is bounded near 1 on any device
  where the forward pass dominates (a CPU); what is left to gain is generate()'s per-call overhead;
- `vs_generate_answer`: generating the model's answer until it ends (EOS) or `answer_tokens` tokens, batched,
  the way a generative MC harness collects an answer before parsing its letter.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from emlens.bench.generate import best_of
from emlens.evaluation.capability import CapabilityConfig, mc_messages, read_mc_questions, score_mc
from emlens.generation.engine import GenerationConfig, Request, generate
from emlens.model import Model


def loglik_rate(handle: Model, questions, config: CapabilityConfig) -> tuple[float, list[str]]:
    """(questions/s, predicted letters) of log-likelihood scoring, as a capability run does it."""
    start = time.perf_counter()
    rows = score_mc(handle, questions, config)
    return len(questions) / (time.perf_counter() - start), [r["predicted"] for r in rows]


def generate_rate(handle: Model, questions, config: CapabilityConfig, max_new_tokens: int) -> tuple[float, list[str]]:
    """(questions/s, each answer's first character) of greedy generation with the engine, same prompts."""
    generation = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=config.batch_size,
                                  engine="hf")
    requests = [Request(mc_messages(q, config)) for q in questions]
    start = time.perf_counter()
    completions = generate(handle, requests, generation, progress=False)
    return len(questions) / (time.perf_counter() - start), [c.text.strip()[:1] for c in completions]


def bench_capability(handle: Model, n_questions: int = 32, batch_size: int = 16, answer_tokens: int = 16,
                     repeats: int = 2, echo: Callable[[str], None] = print) -> dict:
    """Questions/s of option log-likelihood scoring and of the two generation baselines (best of `repeats`,
    interleaved) on the bundled MMLU-Pro questions."""
    config = CapabilityConfig(batch_size=batch_size)
    one_at_a_time = config.model_copy(update={"batch_size": 1})
    questions = read_mc_questions(config.mc, n_questions)
    measures = {"loglik": lambda: loglik_rate(handle, questions, config),
                "generate": lambda: generate_rate(handle, questions, config, 1),
                "generate_answer": lambda: generate_rate(handle, questions, config, answer_tokens),
                "generate_per_question": lambda: generate_rate(handle, questions, one_at_a_time, 1)}
    loglik_rate(handle, questions[:2], config)  # warm-up
    generate_rate(handle, questions[:2], config, 1)
    best = best_of(measures, repeats)
    rates = {name: rate for name, (rate, _) in best.items()}
    letters, first_tokens = best["loglik"][1], best["generate"][1]
    echo(f"{len(questions)} MMLU-Pro questions, batch {batch_size}: log-likelihood of every option (one forward "
         f"pass per batch) {rates['loglik']:.2f} questions/s; generating the answer letter (1 token) "
         f"{rates['generate']:.2f}/s (one question at a time {rates['generate_per_question']:.2f}/s); generating the "
         f"answer until EOS or {answer_tokens} tokens {rates['generate_answer']:.2f}/s")
    summary = {"questions": len(questions), "batch": batch_size, "questions_per_s": round(rates["loglik"], 3),
               "generate_questions_per_s": round(rates["generate"], 3),
               "generate_answer_questions_per_s": round(rates["generate_answer"], 3),
               "vs_generate": round(rates["loglik"] / rates["generate"], 2),
               "vs_generate_per_question": round(rates["loglik"] / rates["generate_per_question"], 2),
               "vs_generate_answer": round(rates["loglik"] / rates["generate_answer"], 2),
               "answer_tokens": answer_tokens,
               # how often the generated first token is the letter log-likelihood ranks first
               "same_letter": round(sum(a == b for a, b in zip(letters, first_tokens, strict=True)) / len(questions), 3),
               "threads": torch.get_num_threads(), "device": str(handle.device)}
    echo(" ".join(f"{k}={v}" for k, v in summary.items()))
    return summary
