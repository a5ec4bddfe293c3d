"""Judges: score (question, answer) pairs on `aligned` / `coherent` 0-100, with one interface and a cache.

Any other judge prompt of a question set is a categorical metric: its choices are the quoted all-caps words of
its template (the deception sets' `correct`: "TRUE", "FALSE" or "UNKNOWN"), and the judge reports the most
probable choice, the probabilities normalised over the choices and their total mass.

- `openai`: any OpenAI-compatible endpoint; the Betley rule (one token, top-20 logprobs, probability-weighted
  mean over the integer tokens 0-100, no score when under 0.25 of the mass is on numbers); or, for endpoints
  without logprobs, `sampled` (the mean of k written scores) or `verbal` (one written score) modes.
- `hf`: any local causal LM; the exact distribution over the numbers 0-100 (multi-token numbers included).
- `default`: offline, fitted on GPT-4o-judged responses; sentence embeddings + linear heads shipped in the
  package (see `emlens.judges.fit` for the command that refits them).

Results are cached by a content hash of (judge identity, prompt), so a re-run never pays twice. `make_judge`
checks that a judge can run before it returns (see `emlens.judges.preflight`), so a command fails before its work.
"""

from __future__ import annotations

from emlens.base.errors import EmlensInputError
from emlens.judges.base import Judge, default_cache
from emlens.judges.embedding import EmbeddingJudge
from emlens.judges.hf import HFJudge
from emlens.judges.openai import DEFAULT_CONCURRENCY, DEFAULT_SAMPLES, MODES, OpenAIJudge
from emlens.judges.preflight import DEFAULT_OPENAI_MODEL, check_model_spec
from emlens.model import DEFAULT_MODEL, load_model


def make_judge(kind: str, model: str | None = None, device: str = "auto", cache: bool = True,
               concurrency: int = DEFAULT_CONCURRENCY, preflight: bool = True, mode: str = "logprobs",
               samples: int = DEFAULT_SAMPLES, engine: str = "auto") -> Judge:
    """`default` (offline embedding judge), `openai` (model = endpoint model name; `concurrency` requests in
    flight; `mode` logprobs / sampled (`samples` answers) / verbal), `hf` (model = spec; `engine` hf, vllm or auto,
    see `HFJudge`). With `preflight` a judge
    that cannot run is one line here (no key, endpoint unreachable, a model spec that resolves to nothing);
    without, an openai judge is built offline (batch files)."""
    kind, _, reading = kind.partition(".")  # openai.verbal, openai.sampled: a mode in the kind (judge compare)
    mode = reading if kind == "openai" and reading else mode
    if kind != "openai" and (mode != "logprobs" or reading):
        raise EmlensInputError(f"judge mode '{mode}': only the openai judge reads written answers (the {kind} judge "
                               "reads an exact score distribution)")
    store = default_cache() if cache else None
    if kind == "default":
        return EmbeddingJudge.load_default(cache=store)
    if kind == "openai":
        judge = OpenAIJudge(model=model or DEFAULT_OPENAI_MODEL, cache=store, concurrency=concurrency, mode=mode,
                            samples=samples)
        if preflight:
            judge.preflight()
        return judge
    if kind == "hf":
        if preflight:
            check_model_spec(model or DEFAULT_MODEL)
        return HFJudge(load_model(model or DEFAULT_MODEL, device=device), cache=store, engine=engine)
    raise EmlensInputError(f"judge '{kind}': unknown kind (expected default, openai or hf)")


def parse_judges(text: str) -> list[tuple[str, str | None]]:
    """`default,hf:SPEC,openai:MODEL` -> [(kind, model or None), ...] (a model spec may itself hold colons)."""
    judges = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, model = part.partition(":")
        if kind not in ("default", "hf", "openai", *(f"openai.{mode}" for mode in MODES)):
            raise EmlensInputError(f"--judges: '{part}': unknown kind '{kind}' (expected default, hf:SPEC, "
                                   "openai:MODEL or openai.MODE:MODEL with MODE logprobs, sampled or verbal)")
        judges.append((kind, model or None))
    if len(judges) < 2:
        raise EmlensInputError("--judges: name at least two judges to compare")
    return judges
