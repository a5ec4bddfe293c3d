"""SAE latents that say what they mean (autointerp, the method of delphi / Paulo et al. 2024).

    result = explain_latents(sae, model, [812, 40], explainer=make_text_model("openai:gpt-4o-mini", cache, 160))
    result.scores       # one row per latent: explanation, detection and fuzzing scores with CIs, n, n_failed

1. Contexts: texts (see `explain_texts`) read through the model at the SAE's site, every token, cut into
   windows of `window` tokens (identical windows once: a chat template's fixed system prompt is in every
   text). The texts are split, whole, into an explainer side and a held-out side (`held_out`).
2. Explanation: the explainer sees the latent's `n_explain` top-activating windows (tokens at `threshold` of
   the window's peak or more between << >>) and `n_random` random windows where it is silent.
3. Detection: the scorer sees held-out windows, plain: up to `n_test` activating ones spread over the latent's
   activation range and as many silent ones, and says which fit the explanation. Balanced accuracy, its 95 %
   interval from Jeffreys-prior draws of each class's accuracy (not degenerate at 0 / n), and n.
4. Fuzzing: the held-out activating windows again, half highlighted where the latent fires and half with as
   many tokens highlighted at random where it does not; the scorer says which are highlighted correctly.
   Accuracy with Wilson's interval, and n.

An explainer answer without an explanation, or a scorer answer that is not a list of n labels 0 / 1, is a
failure: recorded in `failures` (and counted in `n_failed` as the items it left unscored), never a score.
Requests go to the text models in one batch per stage; their cache makes a re-run pay only for what is missing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import Tensor

from emlens.base.config import Config
from emlens.base.errors import EmlensInputError
from emlens.base.io import (
    CFG_FILE,
    FORMAT_VERSION,
    artifact_kind,
    atomic_folder,
    atomic_write_json,
    atomic_write_table,
    fail,
    read_json,
    read_table,
    register_artifact,
    versions,
)
from emlens.base.stats import rate
from emlens.capture.items import ExtractItem, TokenizedItem, items_hash
from emlens.data.order import seeded_order
from emlens.model import Model
from emlens.sae.artifact import LoadedSAE, load_sae
from emlens.sae.decompose import DECOMPOSITION_KIND
from emlens.sae.diff import DIFF_KIND
from emlens.sae.explain_prompts import (
    detection_chat,
    explainer_chat,
    fuzzing_chat,
    highlight,
    one_line,
    parse_labels,
    read_explanation,
)
from emlens.sae.explain_texts import default_sources, read_texts
from emlens.sae.latents import token_activations
from emlens.sae.text_models import TextModel

EXPLANATIONS_KIND = "sae_explanations"
MIN_ACTIVATING = 2  # windows a latent must fire in, on each side of the split, to be explained and scored
N_DRAWS = 4000


class ExplainConfig(Config):
    """How contexts are cut, shown and split (see the module doc)."""

    window: int = Field(32, ge=4)
    n_explain: int = Field(10, ge=1)
    n_random: int = Field(5, ge=0)
    n_test: int = Field(10, ge=1)
    per_prompt: int = Field(5, ge=1)  # windows per scorer prompt
    held_out: float = Field(0.5, gt=0, lt=1)
    threshold: float = Field(0.3, gt=0, le=1)
    max_response_tokens: int = Field(128, ge=1)
    limit: int = Field(200, ge=1)  # texts drawn per file
    seed: int = 0


def scorer_tokens(per_prompt: int) -> int:
    """Room for a list of `per_prompt` labels and a little more (a longer answer is no list anyway)."""
    return 4 * per_prompt + 16


# ---------------------------------------------------------------- windows


@dataclass
class Windows:
    """Token windows of the texts, with the chosen latents' activation at every token."""

    rows: Tensor  # (windows,) the text each window is from
    starts: Tensor  # (windows,) its first position in that text
    lengths: Tensor  # (windows,)
    first_vector: Tensor  # (windows,) the row of `acts` of its first token
    peak: Tensor  # (windows, latents) the latent's largest activation in the window
    acts: Tensor  # (tokens, latents)
    held_out: Tensor  # (windows,) bool: from a held-out text
    tokenized: list[TokenizedItem]

    def ids(self, w: int) -> list[int]:
        start = int(self.starts[w])
        return self.tokenized[int(self.rows[w])].ids[start:start + int(self.lengths[w])]

    def values(self, w: int, column: int) -> Tensor:
        first = int(self.first_vector[w])
        return self.acts[first:first + int(self.lengths[w]), column]


def latent_windows(loaded: LoadedSAE, handle: Model, items: Sequence[ExtractItem], latents: Sequence[int],
                   config: ExplainConfig, progress: bool = False) -> Windows:
    """Read `items` at the SAE's site and cut them into windows (first tokens, the attention sink, left out)."""
    site = loaded.check_fits(handle)
    tokens = token_activations(handle, items, site, max_response_tokens=config.max_response_tokens,
                               progress=progress).without_first_tokens()
    order = torch.argsort(tokens.rows * (int(tokens.positions.max()) + 1) + tokens.positions)  # text by text
    rows, positions = tokens.rows[order], tokens.positions[order]
    acts = torch.cat([loaded.encode(chunk)[:, list(latents)] for chunk in tokens.vectors[order].split(4096)])
    first, window_of = window_bounds(rows, positions, config.window)
    peak = torch.zeros(len(first), len(latents)).scatter_reduce_(
        0, window_of[:, None].expand(-1, len(latents)), acts, "amax")
    windows = Windows(rows[first], positions[first], torch.bincount(window_of), first, peak, acts,
                      torch.zeros(len(first), dtype=torch.bool), tokens.tokenized)
    keep = distinct_windows(windows, min_length=max(4, config.window // 4))
    held = set(seeded_order(len(items), config.seed, "sae-explain-split")[:round(len(items) * config.held_out)])
    held_out = torch.tensor([int(r) in held for r in windows.rows[keep]], dtype=torch.bool)
    return Windows(windows.rows[keep], windows.starts[keep], windows.lengths[keep], windows.first_vector[keep],
                   peak[keep], acts, held_out, tokens.tokenized)


def window_bounds(rows: Tensor, positions: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """(each window's first token, each token's window) for tokens sorted text by text: a window starts where
    the text changes or the position crosses a multiple of `window` (counted from position 1)."""
    slot = (positions - 1) // window
    new = torch.ones(len(rows), dtype=torch.bool)
    new[1:] = (rows[1:] != rows[:-1]) | (slot[1:] != slot[:-1])
    return new.nonzero().flatten(), torch.cumsum(new.long(), 0) - 1


def distinct_windows(windows: Windows, min_length: int) -> Tensor:
    """Indices of the windows to keep: the first of each distinct token sequence, none shorter than `min_length`."""
    seen, keep = set(), []
    for w in range(len(windows.rows)):
        ids = tuple(windows.ids(w))
        if len(ids) >= min_length and ids not in seen:
            seen.add(ids)
            keep.append(w)
    return torch.tensor(keep, dtype=torch.long)


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's text, the pieces joining to the decoded window (a character split over several tokens goes
    to the token that completes it)."""
    pieces, previous = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end])
        if text.endswith("\ufffd") and end < len(ids):
            pieces.append("")
            continue
        pieces.append(text[len(previous):] if text.startswith(previous) else tokenizer.decode(ids[end - 1:end]))
        previous = text
    return pieces


def firing_marks(values: Tensor, threshold: float) -> list[bool]:
    """The tokens at `threshold` of the window's peak or more (none in a window where the latent is silent)."""
    top = float(values.max()) if len(values) else 0.0
    return [top > 0 and float(v) >= threshold * top for v in values]


def shuffled_marks(marks: list[bool], rng: np.random.Generator) -> list[bool]:
    """As many marks as `marks` holds, moved to random tokens where the latent is below the threshold."""
    free = [i for i, mark in enumerate(marks) if not mark]
    chosen = set(rng.choice(free, min(sum(marks), len(free)), replace=False).tolist()) if free else set()
    return [i in chosen for i in range(len(marks))]


# ---------------------------------------------------------------- contexts per latent


@dataclass
class LatentContexts:
    """Which windows one latent is explained and scored on (indices into `Windows`), or why it cannot be."""

    latent: int
    column: int
    shown: list[int] = field(default_factory=list)
    silent: list[int] = field(default_factory=list)
    test_active: list[int] = field(default_factory=list)
    test_silent: list[int] = field(default_factory=list)
    problem: str | None = None


def pick_contexts(windows: Windows, latent: int, column: int, config: ExplainConfig) -> LatentContexts:
    rng = np.random.default_rng([config.seed, latent])
    peak = windows.peak[:, column]
    firing = peak > 0
    sides = {}
    for name, side in (("explainer", ~windows.held_out), ("held-out", windows.held_out)):
        found = (firing & side).nonzero().flatten()
        sides[name] = found[peak[found].argsort(descending=True)].tolist()
        if len(found) < MIN_ACTIVATING:
            return LatentContexts(latent, column, problem=f"fires in {len(found)} window(s) of the {name} texts "
                                                          f"(needs {MIN_ACTIVATING})")
    held = sides["held-out"]
    spread = np.unique(np.linspace(0, len(held) - 1, min(config.n_test, len(held))).round().astype(int))
    test_active = [held[i] for i in spread]  # from the strongest to the weakest, as delphi's quantiles
    return LatentContexts(latent, column, shown=sides["explainer"][:config.n_explain],
                          silent=sample(~firing & ~windows.held_out, config.n_random, rng),
                          test_active=test_active, test_silent=sample(~firing & windows.held_out, len(test_active), rng))


def sample(mask: Tensor, n: int, rng: np.random.Generator) -> list[int]:
    found = mask.nonzero().flatten().numpy()
    return sorted(rng.choice(found, min(n, len(found)), replace=False).tolist()) if len(found) else []


# ---------------------------------------------------------------- the result


@dataclass
class LatentExplanations:
    """`scores`: one row per latent (explanation, status, detection and fuzzing scores with CIs and n, n_failed);
    `explanations`: what the explainer saw and wrote; `items`: every scored window with its truth and the scorer's
    label (missing where the answer was unparsable); `failures`: each answer that gave nothing, and why."""

    scores: pd.DataFrame
    explanations: pd.DataFrame
    items: pd.DataFrame
    failures: pd.DataFrame
    summary: dict = field(default_factory=dict)

    def labels(self) -> dict[int, str]:
        """latent -> explanation, for the latents that have one."""
        found = self.scores.dropna(subset=["explanation"])
        return {int(latent): str(text) for latent, text in zip(found.latent, found.explanation, strict=True)}


FAILURE_COLUMNS = ["latent", "stage", "reason", "answer"]
ITEM_COLUMNS = ["latent", "task", "window", "text", "truth", "prediction", "prompt"]


# ---------------------------------------------------------------- explaining and scoring


def explain_latents(sae: LoadedSAE | str | Path, handle: Model, latents: Sequence[int] | str, explainer: TextModel,
                    scorer: TextModel | None = None, texts: Sequence[str | ExtractItem] | Sequence[Path] | None = None,
                    config: ExplainConfig | None = None, explanations: dict[int, str] | None = None, top: int = 5,
                    progress: bool = False) -> LatentExplanations:
    """Explain `latents` (ids, or a `sae diff` / `sae decompose` folder: its `top` latents) and score each
    explanation by detection and fuzzing (see the module doc). `texts`: strings, ExtractItems or files (None:
    the shared data). `explanations` given for some latents are scored as they are, not asked for."""
    config = config or ExplainConfig()
    loaded = sae if isinstance(sae, LoadedSAE) else load_sae(sae)
    site = loaded.check_fits(handle)
    latents = ranked_latents(latents, loaded, site.name, top) if isinstance(latents, (str, Path)) else \
        checked_latents(latents, loaded)
    items, sources = text_items(texts, config)
    windows = latent_windows(loaded, handle, items, latents, config, progress)
    contexts = [pick_contexts(windows, latent, column, config) for column, latent in enumerate(latents)]
    scorer = scorer or explainer
    tokenizer = handle.tokenizer
    written, failures = explain_contexts(contexts, windows, tokenizer, explainer, explanations or {}, config,
                                         progress)
    items_table, scorer_failures = score_contexts(contexts, written, windows, tokenizer, scorer, config, progress)
    scores = latent_scores(contexts, written, items_table, config)
    summary = {"sae": sae_identity(loaded), "site": site.name, "model": {"spec": handle.spec,
                                                                         "fingerprint": handle.fingerprint},
               "explainer": explainer.identity(), "scorer": scorer.identity(), "config": config.model_dump(),
               "texts": {"n": len(items), "hash": items_hash(items), "sources": sources},
               "n_windows": len(windows.rows), "latents": [int(latent) for latent in latents],
               "n_explained": int(scores.explanation.notna().sum()), "n_failed": int(scores.n_failed.sum())}
    return LatentExplanations(scores, explanation_table(contexts, written),
                              items_table, pd.DataFrame(failures + scorer_failures, columns=FAILURE_COLUMNS), summary)


def text_items(texts, config: ExplainConfig) -> tuple[list[ExtractItem], list[str]]:
    """(items, what they came from): files are read, strings become user turns; None reads the shared data."""
    if texts is None or (texts and isinstance(texts[0], Path)):
        paths = default_sources() if texts is None else list(texts)
        return read_texts(paths, config.limit, config.seed), [str(p) for p in paths]
    items = [t if isinstance(t, ExtractItem) else ExtractItem([{"role": "user", "content": t}]) for t in texts]
    if not items:
        raise EmlensInputError("texts: none given")
    return items, ["given"]


@dataclass
class Written:
    """One latent's explanation and where it came from."""

    explanation: str | None
    status: str  # explained, given, no explanation, too few contexts
    answer: str = ""
    shown: list[str] = field(default_factory=list)


def explain_contexts(contexts: list[LatentContexts], windows: Windows, tokenizer, explainer: TextModel,
                     given: dict[int, str], config: ExplainConfig, progress: bool
                     ) -> tuple[dict[int, Written], list[dict]]:
    """Each latent's explanation: given, or the explainer's (all latents' requests in one batch)."""
    written, failures, asked = {}, [], []
    for found in contexts:
        if found.latent in given:  # kept even where it cannot be scored: it is the user's label
            written[found.latent] = Written(given[found.latent], "given")
        elif found.problem is None:
            asked.append(found)
        else:
            written[found.latent] = Written(None, "too few contexts")
        if found.problem is not None:
            failures.append({"latent": found.latent, "stage": "contexts", "reason": found.problem, "answer": ""})
    shown = {found.latent: [render(windows, w, found.column, tokenizer, config, True) for w in found.shown]
             for found in asked}
    chats = [explainer_chat(shown[found.latent],
                            [render(windows, w, found.column, tokenizer, config, False) for w in found.silent])
             for found in asked]
    for found, answer in zip(asked, explainer.answer(chats, progress) if chats else [], strict=True):
        explanation, problem = read_explanation(answer)
        written[found.latent] = Written(explanation, "explained" if explanation else "no explanation", answer,
                                        shown[found.latent])
        if explanation is None:
            failures.append({"latent": found.latent, "stage": "explanation", "reason": problem,
                             "answer": excerpt(answer)})
    return written, failures


def render(windows: Windows, w: int, column: int, tokenizer, config: ExplainConfig, highlighted: bool) -> str:
    """Window `w` as one line, plain or with the latent's firing tokens between << >>."""
    pieces = token_pieces(tokenizer, windows.ids(w))
    if not highlighted:
        return one_line("".join(pieces))
    return highlight(pieces, firing_marks(windows.values(w, column), config.threshold))


def score_contexts(contexts: list[LatentContexts], written: dict[int, Written], windows: Windows, tokenizer,
                   scorer: TextModel, config: ExplainConfig, progress: bool) -> tuple[pd.DataFrame, list[dict]]:
    """Every detection and fuzzing item of the explained latents, labelled by the scorer (one batch)."""
    items, chats, prompts = [], [], []
    for found in contexts:
        explanation = written[found.latent].explanation
        if explanation is None or found.problem is not None:
            continue
        for index, (task, task_items) in enumerate((("detection", detection_items(found, windows, tokenizer, config)),
                                                    ("fuzzing", fuzzing_items(found, windows, tokenizer, config)))):
            rng = np.random.default_rng([config.seed, found.latent, 2 + index])  # fuzzing's marks took 1
            task_items = [task_items[i] for i in rng.permutation(len(task_items))]
            make_chat = detection_chat if task == "detection" else fuzzing_chat
            for start in range(0, len(task_items), config.per_prompt):
                batch = task_items[start:start + config.per_prompt]
                for item in batch:
                    item.update(latent=found.latent, task=task, prompt=len(chats))
                items += batch
                chats.append(make_chat(explanation, [item["text"] for item in batch]))
                prompts.append((found.latent, task, len(batch)))
    answers = scorer.answer(chats, progress) if chats else []
    labels = [parse_labels(answer, n) for answer, (_, _, n) in zip(answers, prompts, strict=True)]
    failures = [{"latent": latent, "stage": task, "answer": excerpt(answer),
                 "reason": f"the scorer's answer is not a list of {n} labels 0 / 1 ({n} items unscored)"}
                for answer, found, (latent, task, n) in zip(answers, labels, prompts, strict=True) if found is None]
    offsets: dict[int, int] = {}
    for item in items:
        found = labels[item["prompt"]]
        position = offsets.get(item["prompt"], 0)
        offsets[item["prompt"]] = position + 1
        item["prediction"] = None if found is None else found[position]
    table = pd.DataFrame(items, columns=ITEM_COLUMNS)
    table["prediction"] = table["prediction"].astype("Int64")
    return table, failures


def detection_items(found: LatentContexts, windows: Windows, tokenizer, config: ExplainConfig) -> list[dict]:
    return [{"window": w, "truth": truth, "text": render(windows, w, found.column, tokenizer, config, False)}
            for truth, group in ((1, found.test_active), (0, found.test_silent)) for w in group]


def fuzzing_items(found: LatentContexts, windows: Windows, tokenizer, config: ExplainConfig) -> list[dict]:
    """The held-out activating windows, a seeded half highlighted at random; a window whose every token is
    marked has nowhere else to put the marks, so it stays correct."""
    rng = np.random.default_rng([config.seed, found.latent, 1])
    wrong = set(rng.permutation(len(found.test_active))[:len(found.test_active) // 2].tolist())
    items = []
    for i, w in enumerate(found.test_active):
        marked = firing_marks(windows.values(w, found.column), config.threshold)
        moved = shuffled_marks(marked, rng) if i in wrong else marked
        items.append({"window": w, "truth": int(moved == marked),
                      "text": highlight(token_pieces(tokenizer, windows.ids(w)), moved)})
    return items


def excerpt(answer: str, length: int = 160) -> str:
    text = one_line(answer or "").strip()
    return text if len(text) <= length else text[:length - 3] + "..."


# ---------------------------------------------------------------- scores


def balanced_accuracy(truth: np.ndarray, prediction: np.ndarray, seed: int = 0) -> dict:
    """(TPR + TNR) / 2 over the labelled items, its 95 % interval from Jeffreys-prior draws of each class's
    accuracy (a percentile bootstrap collapses to a point at 0 / n or n / n), and n."""
    positive, negative = prediction[truth == 1], prediction[truth == 0]
    n = len(positive) + len(negative)
    if len(positive) == 0 or len(negative) == 0:
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": n}
    rng = np.random.default_rng(seed)
    hits = [(positive == 1).sum(), (negative == 0).sum()]
    draws = [rng.beta(k + 0.5, len(group) - k + 0.5, N_DRAWS) for k, group in zip(hits, (positive, negative))]
    value = (hits[0] / len(positive) + hits[1] / len(negative)) / 2
    low, high = np.percentile((draws[0] + draws[1]) / 2, [2.5, 97.5])
    return {"value": float(value), "ci_low": float(min(low, value)), "ci_high": float(max(high, value)), "n": n}


def accuracy(truth: np.ndarray, prediction: np.ndarray) -> dict:
    found = rate((truth == prediction).astype(float))
    return {"value": found["rate"], "ci_low": found["ci_low"], "ci_high": found["ci_high"], "n": found["n"]}


def latent_scores(contexts: list[LatentContexts], written: dict[int, Written], items: pd.DataFrame,
                  config: ExplainConfig) -> pd.DataFrame:
    rows = []
    for found in contexts:
        row = {"latent": found.latent, "explanation": written[found.latent].explanation,
               "status": written[found.latent].status}
        planned = 2 * len(found.test_active) + len(found.test_silent)
        for task in ("detection", "fuzzing"):
            part = items[(items.latent == found.latent) & (items.task == task)]
            labelled = part.dropna(subset=["prediction"])
            truth, prediction = labelled.truth.to_numpy(int), labelled.prediction.to_numpy(int)
            result = balanced_accuracy(truth, prediction, config.seed) if task == "detection" else \
                accuracy(truth, prediction)
            row.update({task: result["value"], f"{task}_ci_low": result["ci_low"],
                        f"{task}_ci_high": result["ci_high"], f"{task}_n": result["n"],
                        f"{task}_failed": len(part) - len(labelled)})
        row["n_failed"] = planned - row["detection_n"] - row["fuzzing_n"]  # unscored: no explanation, or nonsense
        rows.append(row)
    return pd.DataFrame(rows)


def explanation_table(contexts: list[LatentContexts], written: dict[int, Written]) -> pd.DataFrame:
    return pd.DataFrame([{"latent": found.latent, "explanation": written[found.latent].explanation,
                          "status": written[found.latent].status, "answer": written[found.latent].answer,
                          "contexts": "\n".join(written[found.latent].shown), "problem": found.problem or ""}
                         for found in contexts])


# ---------------------------------------------------------------- latents, SAE identity, labels


def checked_latents(latents: Sequence[int], loaded: LoadedSAE) -> list[int]:
    latents = list(dict.fromkeys(int(latent) for latent in latents))
    if not latents:
        raise EmlensInputError("--latents: no latents given")
    outside = [latent for latent in latents if not 0 <= latent < loaded.d_sae]
    if outside:
        raise EmlensInputError(f"--latents: latent {outside[0]} is not one of the SAE's {loaded.d_sae} latents "
                               f"({loaded.source})")
    return latents


def ranked_latents(source: str | Path, loaded: LoadedSAE, site: str, top: int) -> list[int]:
    """Latent ids written `12,40,7`, or the `top` latents an `emlens sae diff` / `sae decompose` folder ranks
    highest (the folder must come from an SAE at the same site)."""
    path = Path(source)
    if not path.is_dir():
        try:
            ids = [int(part) for part in str(source).split(",") if part.strip()]
        except ValueError:
            raise fail("--latents", f"'{source}' is neither latent ids (12,40,7) nor a folder") from None
        return checked_latents(ids, loaded)
    kind = artifact_kind(path)
    if kind not in (DIFF_KIND, DECOMPOSITION_KIND):
        raise fail(path, f"not an `emlens sae diff` or `emlens sae decompose` folder (kind {kind!r})")
    ranked_site = read_json(path / CFG_FILE).get("site")
    if ranked_site != site:
        raise fail(path, f"ranks the latents of an SAE at {ranked_site}; this SAE reads {site}")
    tables = [pd.read_csv(path / "diff.csv")] if kind == DIFF_KIND else \
        [pd.read_csv(path / name) for name in ("cosine.csv", "attribution.csv")]
    ranked = pd.concat(tables, ignore_index=True).sort_values("rank", kind="stable")
    return checked_latents(ranked.latent.drop_duplicates().head(top).tolist(), loaded)


def sae_identity(loaded: LoadedSAE) -> dict:
    """What says which SAE an explanation belongs to: its source, site, shape and a hash of its decoder."""
    decoder = loaded.decoder.contiguous().numpy().tobytes()
    return {"source": loaded.source, "site": loaded.site_name, "d_in": loaded.d_in, "d_sae": loaded.d_sae,
            "fingerprint": hashlib.sha256(decoder).hexdigest()[:16]}


def read_labels(folder: str | Path, loaded: LoadedSAE) -> dict[int, str]:
    """The explanations of an `emlens sae explain` folder as labels, refused in one line for another SAE."""
    folder = Path(folder)
    if artifact_kind(folder) != EXPLANATIONS_KIND:
        raise fail(folder, "not an `emlens sae explain` folder (--labels)")
    found = open_explanations(folder)
    theirs, ours = found.summary["sae"], sae_identity(loaded)
    if theirs["fingerprint"] != ours["fingerprint"]:
        raise fail(folder, f"explains another SAE ({theirs['site']}, {theirs['d_sae']} latents, decoder "
                           f"{theirs['fingerprint']}); this one is {ours['site']}, {ours['d_sae']} latents, decoder "
                           f"{ours['fingerprint']}")
    return found.labels()


# ---------------------------------------------------------------- the artifact


def save_explanations(result: LatentExplanations, out: str | Path, force: bool = False) -> Path:
    """OUT/cfg.json (the summary), scores.parquet, explanations.parquet, items.parquet, failures.parquet."""
    with atomic_folder(out, EXPLANATIONS_KIND, force) as tmp:
        for name in ("scores", "explanations", "items", "failures"):
            atomic_write_table(getattr(result, name), tmp / f"{name}.parquet")
        atomic_write_json(tmp / CFG_FILE, {"kind": EXPLANATIONS_KIND, "format_version": FORMAT_VERSION,
                                           **result.summary, "versions": versions()})
    return Path(out)


@register_artifact(EXPLANATIONS_KIND, whole=True)
def open_explanations(folder: Path) -> LatentExplanations:
    """`em.load(OUT)` of `emlens sae explain`."""
    folder = Path(folder)
    tables = [read_table(folder / f"{name}.parquet") for name in ("scores", "explanations", "items", "failures")]
    return LatentExplanations(*tables, read_json(folder / CFG_FILE))
