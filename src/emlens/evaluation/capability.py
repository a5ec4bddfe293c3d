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
The scoring itself is `emlens.generation.loglik`'s, the prompts and rows `emlens.evaluation.capability_tasks`'s;
the MC files and GSM8K records are read by `emlens.data.capability`. A file's worked examples are its first `mc_shots` questions (then not evaluated) unless
`mc_shots_from` names another set.

GSM8K exact match: greedy generation with the engine, the last number of the answer (or the number after
'####') against the gold answer's (the number after '####', else the last number of the gold solution). The
problems are a slice of `shared/data/benign/gsm8k_train_alpaca_format.json` (or any GSM8K / Alpaca-format file
given) that mixture training never draws: training (`emlens.training.data._mixture_data`) takes a PREFIX of
`emlens.data.order.seeded_order(n, seed, "mixture-benign")`; the eval slice is the LAST `gsm8k_holdout` (default
500) records of that same order (the same function) for `split_seed` (default 0, the training configs' seed). So
a mixture trained with seed `split_seed` on that file with fewer than n - gsm8k_holdout benign examples (6973 for
the shared file) never saw an evaluated problem; `gsm8k_limit` takes the first problems of the slice. The slice's
definition is written into the run's cfg.json. (A mixture trained with another seed, or `dataset:` training on
the file, draws a different order: pass its seed as `split_seed`, or pick another file.)

Results are a run folder like every eval run: per-question rows (`parts/` per finished batch, then
`samples.parquet`), `cfg.json` with the config, the model's identity, the data's identity and the summary
(accuracy with n and a bootstrap 95 % CI per task). A re-run skips finished questions; every file is written
atomically.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from emlens.base.errors import EmlensInputError
from emlens.base.io import content_hash, file_sha256, register_artifact, short_repr, validate
from emlens.base.stats import rate
from emlens.data.capability import (
    BUNDLED_SHOTS,
    GSM8KProblem,
    MCQuestion,
    gsm8k_path,
    mc_path,
    read_gsm8k_problem,
    read_mc_questions,
    task_records,
)
from emlens.data.order import seeded_order
from emlens.evaluation.capability_tasks import CapabilityConfig, gsm8k_messages, gsm8k_row, score_mc
from emlens.generation.context import Intervention, intervene
from emlens.generation.engine import Completion, GenerationConfig, Request, generate, resolve_engine
from emlens.model import Model
from emlens.runs import RunStore, read_samples

# bump when a change alters what a capability run holds: `emlens run` then redoes finished stages
RESULTS_VERSION = 3  # 2: issue 24's fixes (judge verdicts, rating floor, pushback, CIs, ablation); 3: GSM8K at 256
# tokens with its truncated share, response steering from the last prompt token

log = logging.getLogger(__name__)

TRAINING_SALT = "mixture-benign"  # the salt training's mixtures draw benign examples with
ROW_KEY = ["task", "question_id"]
RUN_KIND = "capability_run"


# ---------------------------------------------------------------- which questions a run asks


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


# ---------------------------------------------------------------- GSM8K: the held-out slice


@dataclass
class HeldOut:
    """The evaluated problems and the definition of the slice they come from (for cfg.json)."""

    problems: list[GSM8KProblem]
    identity: dict = field(default_factory=dict)
    path: Path | None = None


def held_out_gsm8k(config: CapabilityConfig) -> HeldOut:
    """The first `gsm8k_limit` problems of the last `gsm8k_holdout` of training's seeded benign order."""
    path = gsm8k_path(config.gsm8k)
    records = list(task_records(path))
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


# ---------------------------------------------------------------- run folder, summary


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
    interventions = list(interventions)  # auto takes vLLM only where it can apply every one
    config = config.model_copy(update={"engine": resolve_engine(handle, config.engine, interventions)})  # as it ran
    data = data or load_capability_data(config)
    mc, gsm8k = data.mc, data.gsm8k
    store = RunStore(out, ROW_KEY)
    paths = {"mc": str(mc_path(config.mc)) if mc else None, "gsm8k": str(gsm8k.path) if gsm8k.problems else None}
    store.open({"kind": RUN_KIND, "model": handle.describe(), "data_paths": paths,  # sha256s are in the config
                "config": {**config.identity(), "fingerprint": handle.fingerprint, "intervention": intervention_name,
                           "data": data.identity}}, results_version=RESULTS_VERSION)
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
