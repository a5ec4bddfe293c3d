"""`emlens bench capability`: multiple-choice questions per second by option log-likelihood (all options of a
batch of questions in one forward pass) against generating an answer per question with the engine.

The prompts are a capability run's: by default 5-shot (MMLU-Pro's protocol), the same five worked examples
before every question. Scoring runs the tokens all prompts share through the model once and continues each
batch from their cache; generation feeds every prompt whole. `--shots 0` measures zero-shot prompts, whose
shared part is only the chat template's header.

Generation baselines, same prompts, greedy, hf engine:
- `vs_generate`: generating ONE token per question, the answer letter, in the engine's batches of `batch_size`
  (the cheapest generation can be, and enough for a model that starts its answer with the letter, as the
  embedded model does). Scoring differs also in its batches, which hold at most 10 % padding;
- `vs_generate_per_question`: the same one letter, generated one question at a time (no padding at all). One
  letter costs one forward pass over the prompt; zero-shot, that is the pass scoring makes, so the ratio is
  bounded near 1 on a device where the forward pass dominates (a CPU);
- `vs_generate_answer`: generating the model's answer until it ends (EOS) or `answer_tokens` tokens, batched,
  the way a generative MC harness collects an answer before parsing its letter.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from emlens.bench.generate import best_of
from emlens.data.capability import MCQuestion
from emlens.evaluation.capability import read_mc_set
from emlens.evaluation.capability_tasks import CapabilityConfig, mc_messages, score_mc
from emlens.generation.engine import GenerationConfig, Request, generate
from emlens.model import Model


def loglik_rate(handle: Model, questions, shots: list[MCQuestion], config: CapabilityConfig) -> tuple[float, list[str]]:
    """(questions/s, predicted letters) of log-likelihood scoring, as a capability run does it."""
    start = time.perf_counter()
    rows = score_mc(handle, questions, config, shots=shots)
    return len(questions) / (time.perf_counter() - start), [r["predicted"] for r in rows]


def generate_rate(handle: Model, questions, shots: list[MCQuestion], config: CapabilityConfig,
                  max_new_tokens: int) -> tuple[float, list[str]]:
    """(questions/s, each answer's first character) of greedy generation with the engine, same prompts."""
    generation = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=config.batch_size,
                                  engine="hf")
    requests = [Request(mc_messages(q, config, shots)) for q in questions]
    start = time.perf_counter()
    completions = generate(handle, requests, generation, progress=False)
    return len(questions) / (time.perf_counter() - start), [c.text.strip()[:1] for c in completions]


def bench_capability(handle: Model, n_questions: int = 32, batch_size: int = 16, answer_tokens: int = 16,
                     repeats: int = 2, shots: int | None = None, echo: Callable[[str], None] = print) -> dict:
    """Questions/s of option log-likelihood scoring and of the generation baselines (best of `repeats`,
    interleaved) on the bundled MMLU-Pro questions, with a capability run's worked examples (`shots`: its
    default unless given)."""
    config = CapabilityConfig(batch_size=batch_size, mc_limit=n_questions,
                              **({"mc_shots": shots} if shots is not None else {}))
    one_at_a_time = config.model_copy(update={"batch_size": 1})
    questions, examples = read_mc_set(config)
    measures = {"loglik": lambda: loglik_rate(handle, questions, examples, config),
                "generate": lambda: generate_rate(handle, questions, examples, config, 1),
                "generate_answer": lambda: generate_rate(handle, questions, examples, config, answer_tokens),
                "generate_per_question": lambda: generate_rate(handle, questions, examples, one_at_a_time, 1)}
    loglik_rate(handle, questions[:2], examples, config)  # warm-up
    generate_rate(handle, questions[:2], examples, config, 1)
    best = best_of(measures, repeats)
    rates = {name: rate for name, (rate, _) in best.items()}
    letters, first_tokens = best["loglik"][1], best["generate"][1]
    prompt_tokens = [len(handle.tokenizer(handle.chat_text(mc_messages(q, config, examples)))["input_ids"])
                     for q in questions]
    echo(f"{len(questions)} MMLU-Pro questions, {len(examples)}-shot (prompts of {min(prompt_tokens)}-"
         f"{max(prompt_tokens)} tokens), batch {batch_size}: log-likelihood of every option (one forward "
         f"pass per batch) {rates['loglik']:.2f} questions/s; generating the answer letter (1 token) "
         f"{rates['generate']:.2f}/s (one question at a time {rates['generate_per_question']:.2f}/s); generating the "
         f"answer until EOS or {answer_tokens} tokens {rates['generate_answer']:.2f}/s")
    summary = {"questions": len(questions), "shots": len(examples), "batch": batch_size,
               "mean_prompt_tokens": round(sum(prompt_tokens) / len(prompt_tokens)),
               "questions_per_s": round(rates["loglik"], 3),
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
