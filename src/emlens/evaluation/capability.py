"""Capability checks, so that "no capability cost" can be shown or refuted: multiple-choice accuracy by option
log-likelihood, and GSM8K exact match on problems training never sees.

Multiple choice (lm-eval-harness's `multiple_choice` output type, the design of its MMLU task). The user turn
holds the question, its lettered options and an instruction; option k's score is the log-likelihood of its
letter as the assistant's answer, and the prediction is the option with the highest score (no generation).
Every letter is one token after the same context, so a question needs one row, not one per option: the
log-likelihoods of all options of a batch of questions are read in ONE forward pass, from the next-token
distribution at each prompt's last position (lm-eval computes one-token continuations of a shared context the
same way). `mc_format="cloze"` scores the option texts instead (lm-eval's MMLU "continuation" variant; no
options in the prompt): one row per option, all options of a batch of questions padded into one forward pass,
with accuracy by summed log-likelihood and by log-likelihood per byte (lm-eval's acc and acc_norm); it costs
about one pass per option. (The embedded 135M model is at chance on MMLU-Pro either way: 100 questions, letters
0.09 [0.04, 0.15], cloze 0.08 [0.03, 0.14], chance 0.108.)
Few-shot (MMLU's and MMLU-Pro's protocol is 5-shot): `mc_shots` worked examples come before each question as
earlier chat turns (lm-eval's `fewshot_as_multiturn`), the same examples for every question. They are most of a
prompt's tokens, so the tokens every prompt of a run shares are run through the model ONCE and each forward pass
continues from a copy of their cache (`SharedPrefix`); without examples the shared part is the chat template's
header. Scores equal those of the whole prompts (tested to 1e-4).
Data: the bundled `mmlu-pro` (200 MMLU-Pro questions and, as `mmlu-pro-shots`, 14 worked examples, one per
category, none of them among the 200; see resources/capability/README.md) or any MC file: JSONL, JSON list or CSV
records with a question (`question`), options (`options` as a letter -> text mapping or a list, `choices`, or
columns A, B, C, ...) and the answer (`target` / `answer` / `label` / `answer_index`: a letter, a 0-based index,
or the option's text). A file's worked examples are its first `mc_shots` questions (then not evaluated) unless
`mc_shots_from` names another set.

GSM8K exact match: greedy generation with the engine, the last number of the answer (or the number after
'####') against the gold answer's (the number after '####', else the last number of the gold solution). The
problems are a slice of `shared/data/benign/gsm8k_train_alpaca_format.json` (or any GSM8K / Alpaca-format file
given) that mixture training never draws: training (`emlens.training.data._mixture_data`) takes a PREFIX of
`emlens.data.order.seeded_order(n, seed, "mixture-benign")`; the eval slice is the LAST `gsm8k_holdout` (default
500) records of that same order (the same function) for `split_seed` (default 0, the training configs' seed). So a mixture trained with seed
`split_seed` on that file with fewer than n - gsm8k_holdout benign examples (6973 for the shared file) never
saw an evaluated problem; `gsm8k_limit` takes the first problems of the slice. The slice's definition is written
into the run's cfg.json. (A mixture trained with another seed, or `dataset:` training on the file, draws a
different order: pass its seed as `split_seed`, or pick another file.)

Results are a run folder like every eval run: per-question rows (`parts/` per finished batch, then
`samples.parquet`), `cfg.json` with the config, the model's identity, the data's identity and the summary
(accuracy with n and a bootstrap 95 % CI per task). A re-run skips finished questions; every file is written
atomically.
"""

from __future__ import annotations

import copy
import logging
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from emlens.base.errors import EmlensInputError
from emlens.base.io import (
    content_hash,
    fail,
    file_sha256,
    find_shared_data,
    load_yaml_model,
    parse_json,
    register_artifact,
    short_repr,
    validate,
)
from emlens.base.stats import rate
from emlens.data.order import seeded_order
from emlens.data.questions import read_records
from emlens.evaluation.config import MC_INSTRUCTION
from emlens.generation.context import CONTINUED_PREFILL, Intervention, describe, intervene
from emlens.generation.engine import (
    DEFAULT_BATCH_SIZE,
    Completion,
    GenerationConfig,
    Request,
    generate,
    left_pad,
    resolve_engine,
)
from emlens.model import Model
from emlens.runs import RunStore, read_samples

# bump when a change alters what a capability run holds: `emlens run` then redoes finished stages
RESULTS_VERSION = 3  # 2: issue 24's fixes (judge verdicts, rating floor, pushback, CIs, ablation); 3: GSM8K at 256
# tokens with its truncated share, response steering from the last prompt token

log = logging.getLogger(__name__)

BUNDLED_MC = {"mmlu-pro": "capability/mmlu_pro_200.jsonl",  # name -> file under emlens/resources
              "mmlu-pro-shots": "capability/mmlu_pro_shots.jsonl"}
BUNDLED_SHOTS = {"mmlu-pro": "mmlu-pro-shots"}  # a bundled set's worked examples, never among its questions
SHARED_GSM8K = "benign/gsm8k_train_alpaca_format.json"  # under the shared data folder
TRAINING_SALT = "mixture-benign"  # the salt training's mixtures draw benign examples with
GSM8K_INSTRUCTION = "Solve the problem step by step. End with the final answer as a number after '####'."
ROW_KEY = ["task", "question_id"]
RUN_KIND = "capability_run"


class CapabilityConfig(BaseModel):
    """Everything that defines a capability run (recorded in its cfg.json, checked when a run resumes)."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[Literal["mc", "gsm8k"]] = Field(["mc", "gsm8k"], min_length=1)
    mc: str = Field("mmlu-pro", description="bundled MC set name or an MC file (JSONL, JSON, CSV)")
    mc_limit: int | None = Field(100, ge=1, description="first N questions of the MC file; None: all")
    mc_format: Literal["letters", "cloze"] = "letters"
    mc_shots: int = Field(5, ge=0, description="worked examples before each question, as earlier chat turns")
    mc_shots_from: str | None = Field(None, description="MC set the worked examples come from; None: the bundled "
                                                        "set's own (mmlu-pro), else the MC file's first mc_shots "
                                                        "questions, which are then not evaluated")
    mc_instruction: str = MC_INSTRUCTION
    answer_prefix: str = Field("", description="text put in the assistant's mouth before the scored answer")
    gsm8k: str = Field("shared", description=f"GSM8K file, or 'shared': {SHARED_GSM8K} in the shared data folder")
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


def held_out_for(config: CapabilityConfig, seed: int, benign: str | None,
                 benign_drawn: int | None = None) -> CapabilityConfig:
    """The config with its GSM8K slice cut from the end of a mixture run's own benign training order (the run's
    seed and, unless the config names another file, its benign file), so that adapter never trained on it;
    `benign_drawn` (the most benign examples any evaluated mixture drew) is checked against the slice when the
    GSM8K file is the benign file."""
    update: dict[str, Any] = {"split_seed": seed}
    if config.gsm8k == "shared" and benign is not None:
        update["gsm8k"] = benign
    gsm8k = update.get("gsm8k", config.gsm8k)
    if benign is not None and gsm8k != "shared" and Path(gsm8k).resolve() == Path(benign).resolve():
        update["trained_benign"] = benign_drawn
    return config.model_copy(update=update)


def build_capability_config(path: str | Path | None = None, **flags: Any) -> CapabilityConfig:
    """A CapabilityConfig from a YAML file (optional) with flags laid over it (None = not given): a flag, else
    the YAML's field, else the class default."""
    base = load_yaml_model(CapabilityConfig, path).model_dump() if path is not None else {}
    given = {name: value for name, value in flags.items() if value is not None}
    return validate(CapabilityConfig, {**base, **given}, "command line" if path is None else path)


# ---------------------------------------------------------------- multiple-choice data


@dataclass
class MCQuestion:
    id: str
    question: str
    options: list[str]
    letters: list[str]
    answer: int  # index of the correct option


def mc_path(name_or_path: str) -> Path:
    """A bundled MC set name (see BUNDLED_MC) or a path to an MC file."""
    if name_or_path in BUNDLED_MC:
        return Path(str(resources.files("emlens") / "resources" / BUNDLED_MC[name_or_path]))
    path = Path(name_or_path)
    if not path.is_file():
        raise EmlensInputError(f"MC set '{name_or_path}': no such file (bundled: {', '.join(BUNDLED_MC)})")
    return path


def read_mc_questions(name_or_path: str, limit: int | None = None) -> list[MCQuestion]:
    """The questions of an MC file (the first `limit`); a bad record is one line naming the file and line."""
    path = mc_path(name_or_path)
    questions, seen = [], {}
    for n, (where, record) in enumerate(_records(path), start=1):
        question = _mc_question(record, where, default_id=f"{path.stem}/{n}")
        if question.id in seen:
            raise fail(where, f"duplicate question id {question.id!r} (first at {seen[question.id]})")
        seen[question.id] = where
        questions.append(question)
    if not questions:
        raise fail(path, "empty file (no records)")
    return questions[:limit] if limit is not None else questions


def read_mc_set(config: CapabilityConfig) -> tuple[list[MCQuestion], list[MCQuestion]]:
    """(the evaluated questions, the worked examples shown before each)."""
    k = config.mc_shots
    source = config.mc_shots_from or BUNDLED_SHOTS.get(config.mc)
    if k == 0:
        return read_mc_questions(config.mc, config.mc_limit), []
    if source is None:  # the file's own first questions
        questions = read_mc_questions(config.mc)
        if len(questions) <= k:
            raise EmlensInputError(f"MC set '{config.mc}': {len(questions)} questions leave none to evaluate after "
                                   f"mc_shots={k} worked examples (lower mc_shots or set mc_shots_from)")
        rest = questions[k:]
        return (rest[:config.mc_limit] if config.mc_limit is not None else rest), questions[:k]
    shots = read_mc_questions(source)[:k]
    if len(shots) < k:
        raise EmlensInputError(f"mc_shots_from '{source}': {len(shots)} questions, fewer than mc_shots={k}")
    questions = read_mc_questions(config.mc, config.mc_limit)
    shown = {q.question for q in shots} & {q.question for q in questions}
    if shown:
        raise EmlensInputError(f"mc_shots_from '{source}': {len(shown)} worked example(s) are also evaluated "
                               f"questions of '{config.mc}' (e.g. {short_repr(next(iter(shown)))})")
    return questions, shots


def _records(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) of a JSONL, JSON-list or CSV file; `where` names the file and line (or JSON item)."""
    if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        raise fail(path, f"unsupported file type '{path.suffix}' (expected .jsonl, .json or .csv)")
    yield from read_records(path)


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWER_FIELDS = ("target", "answer", "Answer", "label", "answer_index")


def _mc_question(record: dict, where: str, default_id: str) -> MCQuestion:
    text = record.get("question", record.get("Question"))
    if not isinstance(text, str) or not text.strip():
        raise fail(f"{where}, field 'question'", f"must be a non-empty string (got {short_repr(text)})")
    letters, options = _mc_options(record, where)
    answer = _mc_answer(record, letters, options, where)
    raw_id = record.get("id", record.get("question_id"))
    return MCQuestion(id=str(raw_id) if raw_id not in (None, "") else default_id, question=text.strip(),
                      options=options, letters=letters, answer=answer)


def _mc_options(record: dict, where: str) -> tuple[list[str], list[str]]:
    """(letters, option texts) from `options` / `choices` (mapping or list, a JSON list in a CSV cell) or
    columns A, B, C, ..."""
    raw = record.get("options", record.get("choices"))
    name = "options" if "options" in record else "choices"
    if raw is None:  # columns A, B, C, ... (MMLU CSV exports)
        raw = {c: record[c] for c in LETTERS if record.get(c) not in (None, "")}
        name = "A, B, C, ..."
    if isinstance(raw, str) and raw.strip().startswith("["):
        raw = parse_json(raw, where)
    if isinstance(raw, list):
        raw = dict(zip(LETTERS, raw, strict=False)) if len(raw) <= len(LETTERS) else None
    if not isinstance(raw, dict) or len(raw) < 2:
        raise fail(f"{where}, field '{name}'", "expected at least 2 options (a mapping letter -> text, a list, "
                                               f"or columns A, B, ...), got {short_repr(raw)}")
    for letter, option in raw.items():
        if len(str(letter)) != 1 or str(letter) not in LETTERS or not isinstance(option, str) or not option.strip():
            raise fail(f"{where}, field '{name}'", f"option {letter!r}: expected a letter A-Z and a non-empty text "
                                                   f"(got {short_repr(option)})")
    return list(raw), [str(o).strip() for o in raw.values()]


def _mc_answer(record: dict, letters: list[str], options: list[str], where: str) -> int:
    """The correct option's index from a letter, a 0-based index (int or digit string) or the option's text."""
    name = next((f for f in ANSWER_FIELDS if record.get(f) not in (None, "")), None)
    if name is None:
        raise fail(where, f"no answer field (expected one of {', '.join(ANSWER_FIELDS)})")
    value = record[name]
    text = str(value).strip()
    if len(text) == 1 and text.upper() in letters:
        return letters.index(text.upper())
    if (isinstance(value, int) and not isinstance(value, bool)) or text.isdigit():
        if 0 <= int(text) < len(options):
            return int(text)
    elif text in options:
        return options.index(text)
    raise fail(f"{where}, field '{name}'", f"{short_repr(value)} is not an option letter ({letters[0]}-{letters[-1]}), "
                                           f"a 0-based index below {len(options)} or an option's text")


# ---------------------------------------------------------------- scoring continuations by log-likelihood


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and of its continuation, split the lm-eval way: spaces at the end of the context
    move to the continuation, and the continuation is what encoding the whole adds after the context's tokens."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids):]


@dataclass
class SharedPrefix:
    """Tokens every row of a scoring run starts with (few-shot examples, the chat template's header), run through
    the model once: each forward pass continues from a copy of their cache instead of recomputing them."""

    ids: list[int]
    cache: Any  # the model's past_key_values after the prefix, batch 1

    def for_rows(self, rows: int) -> Any:
        cache = copy.deepcopy(self.cache)  # a forward pass appends to the cache it is given
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return cache


def common_prefix(rows: list[list[int]]) -> list[int]:
    """The longest token prefix all rows share, leaving every row at least one token of its own (the position
    its scores are read at)."""
    shortest = min(len(r) for r in rows) - 1
    first = rows[0]
    for n in range(shortest):
        if any(r[n] != first[n] for r in rows):
            return first[:n]
    return first[:max(shortest, 0)]


@torch.inference_mode()
def shared_prefix(handle: Model, contexts: list[list[int]]) -> SharedPrefix | None:
    """The contexts' common prefix with its cache, computed in one pass (under the model's interventions, as
    prompt tokens, like the same tokens in a whole prompt); None when they share no token."""
    ids = common_prefix(contexts)
    if not ids:
        return None
    tokens = torch.tensor([ids], device=handle.device)
    prompt = torch.ones_like(tokens, dtype=torch.bool)
    with describe(handle, prompt, ~prompt, -1, prompt_ends=False):
        cache = handle.model(input_ids=tokens, use_cache=True, logits_to_keep=1).past_key_values
    return SharedPrefix(ids, cache)


@torch.inference_mode()
def continuation_logprobs(handle: Model, contexts: list[list[int]], continuations: list[list[list[int]]],
                          prefix: SharedPrefix | None = None) -> list[list[float]]:
    """sum log P(continuation | context) for every continuation of every context, in ONE forward pass.

    A context whose continuations are all one token is one row, read at its last position; otherwise each
    (context, continuation) pair is a row. Rows are left-padded (the padding is masked, and described to
    interventions as neither prompt nor response), so every row ends at the last position and only the last
    positions' logits are computed. With a `prefix` every context starts with, only the rest of each row is fed,
    after a copy of the prefix's cache.
    """
    rows, reads = [], []  # reads: (question, option, row, continuation)
    for q, (context, options) in enumerate(zip(contexts, continuations, strict=True)):
        if any(len(c) == 0 for c in options):
            raise ValueError(f"context {q}: a continuation adds no token")
        if all(len(c) == 1 for c in options):
            rows.append(context)
            reads += [(q, o, len(rows) - 1, c) for o, c in enumerate(options)]
            continue
        for o, c in enumerate(options):
            rows.append(context + c[:-1])  # the last token is only predicted, never fed
            reads.append((q, o, len(rows) - 1, c))
    shared = len(prefix.ids) if prefix is not None else 0
    if prefix is not None and any(r[:shared] != prefix.ids or len(r) <= shared for r in rows):
        raise ValueError("a row does not continue the shared prefix")
    keep = max(len(c) for *_, c in reads)
    ids, attention = left_pad([r[shared:] for r in rows], handle.tokenizer.pad_token_id, handle.device)
    positions = shared + (attention.cumsum(-1) - 1).clamp(min=0)
    response = torch.zeros_like(attention, dtype=torch.bool)
    for _, _, row, c in reads:  # fed continuation tokens are the answer, the rest of a row is the prompt
        if len(c) > 1:
            response[row, -(len(c) - 1):] = True
    padded, prompt = not bool(attention.all()), attention.bool() & ~response
    past = prefix.for_rows(len(rows)) if prefix is not None else None
    if padded and prefix is not None:  # the mask covers the cached positions too
        attention = torch.cat([attention.new_ones(len(rows), shared), attention], dim=1)
    with describe(handle, prompt, response, -1 if prefix is None else CONTINUED_PREFILL):
        logits = handle.model(input_ids=ids, attention_mask=attention if padded else None, position_ids=positions,
                              past_key_values=past, use_cache=past is not None, logits_to_keep=keep).logits
    scores = [[0.0] * len(options) for options in continuations]
    row_logprobs: dict[int, torch.Tensor] = {}  # a letters row serves all its options: normalise it once
    for q, o, row, c in reads:
        if row not in row_logprobs:
            row_logprobs[row] = logits[row].float().log_softmax(-1)
        steps = row_logprobs[row][keep - len(c):]  # token c[j] is predicted at kept position keep - len(c) + j
        scores[q][o] = float(steps[torch.arange(len(c)), torch.tensor(c)].sum())
    return scores


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


MAX_PADDING = 0.1  # the share of a forward pass's token slots that may be padding


@dataclass
class EncodedMC:
    question: MCQuestion
    context: list[int]
    continuations: list[list[int]]

    @property
    def rows(self) -> int:
        return 1 if all(len(c) == 1 for c in self.continuations) else len(self.continuations)

    @property
    def length(self) -> int:
        return len(self.context) + max(len(c) for c in self.continuations)


def mc_batches(encoded: list[EncodedMC], batch_size: int, max_padding: float = MAX_PADDING,
               shared: int = 0) -> Iterator[list[EncodedMC]]:
    """Questions sorted by length, grouped so that a forward pass holds at most `batch_size` rows (cloze: a row
    per option, a question's options never split across passes) and at most `max_padding` of its token slots are
    padding (of the tokens fed: all but the `shared` prefix). Padding is work thrown away: on a CPU, where a row
    costs the same batched or not, batches of 16 of the bundled MMLU-Pro questions (100-600 tokens) padded to
    their longest ran at half the speed of one at a time."""
    batch: list[EncodedMC] = []
    for item in sorted(encoded, key=lambda e: e.length):
        grown = [*batch, item]
        rows = sum(e.rows for e in grown)
        slots = rows * (item.length - shared)  # sorted: the newest item is the longest
        used = sum(e.rows * (e.length - shared) for e in grown)
        if batch and (rows > batch_size or slots - used > max_padding * slots):
            yield batch
            grown = [item]
        batch = grown
    if batch:
        yield batch


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

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def canonical_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '$72' -> '72'; None when it is not a number."""
    try:
        value = Decimal(text.replace(",", "").replace("$", "").rstrip("."))
    except InvalidOperation:
        return None
    return format(value.normalize(), "f") if value != 0 else "0"


def final_number(text: str) -> str | None:
    """The answer of a GSM8K solution: the number after the last '####' if there is one, else the last number."""
    if "####" in text:
        after = NUMBER.findall(text.rsplit("####", 1)[1])
        if after:
            return canonical_number(after[0])
    found = NUMBER.findall(text)
    return canonical_number(found[-1]) if found else None


@dataclass
class GSM8KProblem:
    id: str
    question: str
    gold: str  # canonical number


@dataclass
class HeldOut:
    """The evaluated problems and the definition of the slice they come from (for cfg.json)."""

    problems: list[GSM8KProblem]
    identity: dict = field(default_factory=dict)
    path: Path | None = None


def gsm8k_path(spec: str) -> Path:
    if spec != "shared":
        path = Path(spec)
        if not path.is_file():
            raise EmlensInputError(f"GSM8K file '{spec}': no such file")
        return path
    shared = find_shared_data()
    if shared is None or not (shared / SHARED_GSM8K).is_file():
        raise EmlensInputError(f"GSM8K: {SHARED_GSM8K} not found in a shared/data folder (set EMLENS_SHARED_DATA, "
                               "pass a GSM8K file, or leave gsm8k out of the tasks)")
    return shared / SHARED_GSM8K


def read_gsm8k_problem(record: dict, where: str, index: int) -> GSM8KProblem:
    """An Alpaca-format record (instruction, input, output) or a GSM8K one (question, answer with '####')."""
    question = record.get("instruction", record.get("question"))
    solution = record.get("output", record.get("answer"))
    for name, value in (("instruction' or 'question", question), ("output' or 'answer", solution)):
        if not isinstance(value, str) or not value.strip():
            raise fail(f"{where}, field '{name}'", f"must be a non-empty string (got {short_repr(value)})")
    extra = record.get("input") or ""
    gold = final_number(solution)
    if gold is None:
        raise fail(f"{where}, field '{'output' if 'output' in record else 'answer'}'",
                   "the solution holds no number to compare against")
    text = f"{question}\n\n{extra}" if isinstance(extra, str) and extra.strip() else question
    return GSM8KProblem(id=f"gsm8k/{index}", question=text.strip(), gold=gold)


def held_out_gsm8k(config: CapabilityConfig) -> HeldOut:
    """The first `gsm8k_limit` problems of the last `gsm8k_holdout` of training's seeded benign order."""
    path = gsm8k_path(config.gsm8k)
    records = list(_records(path))
    n, holdout = len(records), config.gsm8k_holdout
    if holdout >= n:
        raise EmlensInputError(f"{path}: gsm8k_holdout {holdout} leaves nothing for training ({n} records)")
    if config.trained_benign is not None and config.trained_benign > n - holdout:
        raise EmlensInputError(f"{path}: the mixture drew {config.trained_benign} benign examples from this file, "
                               f"so its last {holdout} (gsm8k_holdout) overlap training: lower gsm8k_holdout to at "
                               f"most {n - config.trained_benign}, or evaluate on another GSM8K file")
    slice_ = seeded_order(n, config.split_seed, TRAINING_SALT)[n - holdout:]
    chosen = slice_[:config.gsm8k_limit] if config.gsm8k_limit is not None else slice_
    problems = [read_gsm8k_problem(records[i][1], records[i][0], i) for i in chosen]
    identity = {"sha256": file_sha256(path), "n_records": n,
                "slice": f"the last {holdout} of seeded_order({n}, seed={config.split_seed}, salt="
                         f"'{TRAINING_SALT}'), first {len(chosen)} of them",
                "never_trained_when": f"a mixture with this benign file, seed {config.split_seed}, and at most "
                                      f"{n - holdout} benign examples",
                "record_indices": [int(i) for i in chosen]}
    return HeldOut(problems, identity, path)


def gsm8k_messages(problem: GSM8KProblem, config: CapabilityConfig) -> list[dict]:
    return [{"role": "user", "content": f"{problem.question}\n\n{config.gsm8k_instruction}"}]


def gsm8k_row(problem: GSM8KProblem, completion: Completion) -> dict:
    predicted = final_number(completion.text)
    return _row("gsm8k", problem.id, prompt=problem.question, answer=problem.gold, predicted=predicted or "",
                correct=predicted == problem.gold, correct_norm=predicted == problem.gold, n_options=0,
                logprobs=[], response=completion.text, finish_reason=completion.finish_reason)


# ---------------------------------------------------------------- rows, run folder, summary


def _row(task: str, question_id: str, **values: Any) -> dict:
    """One schema for both tasks, so the table has no mixed-type column."""
    return {"task": task, "question_id": question_id, "prompt": "", "answer": "", "predicted": "", "correct": False,
            "correct_norm": False, "n_options": 0, "logprobs": [], "response": "", "finish_reason": "", **values}


def summarize_capability(rows: pd.DataFrame, config: CapabilityConfig | None = None) -> dict:
    """Per task: accuracy with its n and bootstrap 95 % CI; MC also chance (mean 1 / options), the number of worked
    examples shown (`shots`) and, for cloze, accuracy per byte."""
    summary = {}
    for task, group in rows.groupby("task", sort=True):
        result = {"accuracy": rate(group["correct"].astype(float))}
        if task == "gsm8k":  # cut at max_new_tokens: scored by the last number it reached
            result["truncated"] = rate((group["finish_reason"] == "length").astype(float))
        if task == "mc":
            result["chance"] = float((1.0 / group["n_options"]).mean())
            if config is not None:
                result["shots"] = config.mc_shots
            if config is not None and config.mc_format == "cloze":
                result["accuracy_norm"] = rate(group["correct_norm"].astype(float))
        summary[str(task)] = result
    return summary


@dataclass
class CapabilityResult:
    rows: pd.DataFrame  # one per question: task, question_id, answer, predicted, correct, logprobs, response...
    summary: dict  # per task: {"accuracy": {rate, n, ci_low, ci_high}, ...}
    folder: Path | None


@dataclass
class CapabilityData:
    mc: list[MCQuestion]
    shots: list[MCQuestion]  # the worked examples shown before each MC question
    gsm8k: HeldOut
    identity: dict  # what the run evaluates, for cfg.json (a resumed run must evaluate the same)


def capability_input_files(config: CapabilityConfig) -> dict[str, Path]:
    """Every data file a capability run reads, by field: what a finished run's content depends on."""
    files = {}
    if "mc" in config.tasks:
        files["mc"] = mc_path(config.mc)
        shots = config.mc_shots_from or BUNDLED_SHOTS.get(config.mc)
        if config.mc_shots and shots is not None:
            files["mc_shots_from"] = mc_path(shots)
    if "gsm8k" in config.tasks:
        files["gsm8k"] = gsm8k_path(config.gsm8k)
    return files


def load_capability_data(config: CapabilityConfig) -> CapabilityData:
    """The configured tasks' questions (read before a model is loaded, so a bad file fails fast)."""
    identity = {}
    mc, shots = read_mc_set(config) if "mc" in config.tasks else ([], [])
    if mc:
        identity["mc"] = {"sha256": file_sha256(mc_path(config.mc)), "n": len(mc),
                          "ids_sha256": content_hash([q.id for q in mc]), "shot_ids": [q.id for q in shots]}
    gsm8k = held_out_gsm8k(config) if "gsm8k" in config.tasks else HeldOut([])
    if gsm8k.problems:
        identity["gsm8k"] = gsm8k.identity
    return CapabilityData(mc, shots, gsm8k, identity)


def run_capability(handle: Model, config: CapabilityConfig, out: str | Path, interventions: Iterable[Intervention] = (),
                   intervention_name: str = "none", progress: bool = True,
                   data: CapabilityData | None = None) -> CapabilityResult:
    """Run the configured tasks into the run folder `out` (a re-run skips finished questions)."""
    config = config.model_copy(update={"engine": resolve_engine(handle, config.engine)})  # recorded as it ran
    data = data or load_capability_data(config)
    mc, gsm8k = data.mc, data.gsm8k
    store = RunStore(out, ROW_KEY)
    paths = {"mc": str(mc_path(config.mc)) if mc else None, "gsm8k": str(gsm8k.path) if gsm8k.problems else None}
    store.open({"kind": RUN_KIND, "model": handle.describe(), "data_paths": paths,  # sha256s are in the config
                "config": {**config.model_dump(), "fingerprint": handle.fingerprint, "intervention": intervention_name,
                           "data": data.identity}})
    done = store.done_keys()
    extra = {"fingerprint": handle.fingerprint, "intervention": intervention_name}
    interventions = list(interventions)
    with intervene(handle, interventions):
        _run_mc(handle, [q for q in mc if ("mc", q.id) not in done], data.shots, config, store, extra, progress)
    _run_gsm8k(handle, [p for p in gsm8k.problems if ("gsm8k", p.id) not in done], config, store, extra,
               interventions, progress)
    table = store.read_parts()
    summary = summarize_capability(table, config)
    table = store.finish({"summary": summary}, table=table)
    return CapabilityResult(table, summary, Path(out))


def _run_mc(handle: Model, questions: list[MCQuestion], shots: list[MCQuestion], config: CapabilityConfig,
            store: RunStore, extra: dict, progress: bool) -> None:
    if questions:
        log.info("multiple choice: %d questions (%s, %d-shot)", len(questions), config.mc_format, len(shots))
        score_mc(handle, questions, config, progress, on_batch=lambda rows: store.append({**r, **extra} for r in rows),
                 shots=shots)


def _run_gsm8k(handle: Model, problems: list[GSM8KProblem], config: CapabilityConfig, store: RunStore, extra: dict,
               interventions: list, progress: bool) -> None:
    if not problems:
        return
    log.info("gsm8k: %d problems, greedy, up to %d new tokens", len(problems), config.max_new_tokens)
    generation = GenerationConfig(max_new_tokens=config.max_new_tokens, temperature=0.0,
                                  batch_size=config.batch_size, engine=config.engine)
    requests = [Request(gsm8k_messages(p, config)) for p in problems]

    def keep(indices: list[int], completions: list[Completion]) -> None:
        store.append({**gsm8k_row(problems[i], c), **extra} for i, c in zip(indices, completions, strict=True))

    generate(handle, requests, generation, interventions=interventions, progress=progress, on_batch=keep)


def capability(model: Model, out: str | Path | None = None, config: CapabilityConfig | None = None,
               interventions=(), progress: bool = False, **fields) -> CapabilityResult:
    """`em.capability`: MC accuracy by option log-likelihood and GSM8K exact match (see CapabilityConfig for
    `fields`, e.g. `mc_limit=200, tasks=["mc"]`). With `out` the run folder is kept and a re-run resumes it.
    `interventions` (e.g. `direction.ablate()`) apply to every forward pass, so a steering's capability cost is
    measured the same way."""
    config = validate(CapabilityConfig, {**(config or CapabilityConfig()).model_dump(), **fields}, "capability()")
    interventions = list(interventions)
    name = "+".join(getattr(i, "name", type(i).__name__) for i in interventions) or "none"
    if out is not None:
        return run_capability(model, config, out, interventions, name, progress)
    with tempfile.TemporaryDirectory(prefix="emlens-capability-") as tmp:
        result = run_capability(model, config, Path(tmp) / "run", interventions, name, progress)
        return CapabilityResult(result.rows, result.summary, None)


@register_artifact(RUN_KIND)
def read_capability(run: str | Path) -> pd.DataFrame:
    """The per-question table of a capability run folder."""
    return read_samples(run)


def format_summary(summary: dict) -> list[str]:
    """One line per task, e.g. 'mc: accuracy 0.270 [0.190, 0.360] (n=100; chance 0.108)'."""
    lines = []
    for task, result in summary.items():
        acc = result["accuracy"]
        name = "exact match" if task == "gsm8k" else "accuracy"
        line = f"{task}: {name} {acc['rate']:.3f} [{acc['ci_low']:.3f}, {acc['ci_high']:.3f}] (n={acc['n']}"
        if "chance" in result:
            line += f"; chance {result['chance']:.3f}"
        if "shots" in result:
            line += f"; {result['shots']}-shot"
        if "accuracy_norm" in result:
            norm = result["accuracy_norm"]
            line += f"; per byte {norm['rate']:.3f} [{norm['ci_low']:.3f}, {norm['ci_high']:.3f}]"
        if "truncated" in result:
            line += f"; {result['truncated']['rate']:.0%} cut at max_new_tokens"
        lines.append(line + ")")
    return lines
