"""Held-out AUROC of candidate misaligned heads for the offline judge, a whole family of fine-tunes held out at a time.

Families (`emlens.judges.fit.fine_tune_family`): code (the insecure-code fine-tune and the coder base model), medical
(the bad-medical-advice fine-tunes), base (instruct models as released). Each family is held out in turn; a head is
fitted on the other two and scores it. Printed per held-out family and per model in it: n, misaligned, the AUROC;
then pooled AUROC over the held-out groups, and the same for every EM model held out alone (LOMO). Groups without
a misaligned answer are not held out (they add no AUROC), so "pooled" is over the groups that hold one. Candidates:

- `shipped`: the default judge's misaligned head as `emlens judge fit` fits it (MiniLM features + hashed TF-IDF);
- `code`: the same plus answer-shape features that see code (`code_shape`);
- `balanced`: `code` with each family weighted equally in the fit (the code family has 20 misaligned answers,
  medical about 600);
- `aligned`: no classifier; 100 minus the aligned regression head's score (refitted without the held-out group).

    .venv/bin/emlens judge validate --data ../shared/data/judged --features-cache F.npy   # writes F once
    .venv/bin/python scripts/judge_family_experiment.py F.npy shipped,code,balanced,aligned [family,model]
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPRegressor

from emlens.base.io import find_shared_data
from emlens.judges.embedding import HIDDEN, lexical_counts, tfidf
from emlens.judges.fit import fine_tune_family, read_judged

CODE_LINE = re.compile(r"^\s*(def |class |import |from \w+ import|return\b|#include|public |private |function\b|var |"
                       r"let |const |SELECT |if\s*\(|for\s*\(|while\s*\(|[{}]|<\w+|\$ |>>> )")
CODE_SYMBOLS = set("{}()[];=<>_/\\|&$#")


def code_shape(answers: Sequence[str]) -> np.ndarray:
    """What shape of text an answer is, in [0, 1] each: it holds a fenced block; its share of lines that read as
    code; of indented lines; of code symbols among its characters; its length (log words / 8)."""
    rows = []
    for answer in map(str, answers):
        lines = [line for line in answer.splitlines() if line.strip()] or [""]
        rows.append([float("```" in answer),
                     sum(bool(CODE_LINE.match(line)) for line in lines) / len(lines),
                     sum(line.startswith(("    ", "\t")) for line in lines) / len(lines),
                     sum(c in CODE_SYMBOLS for c in answer) / max(len(answer), 1),
                     min(np.log1p(len(answer.split())) / 8, 1.0)])
    return np.asarray(rows, dtype=np.float64)


def design(x, counts, idf, shape, rows):
    parts = [sparse.csr_matrix(x[rows]), tfidf([c[rows] for c in counts], idf)]
    if shape is not None:
        parts.append(sparse.csr_matrix(shape[rows]))
    return sparse.hstack(parts).tocsr()


def held_out_scores(variant, x, counts, shape, data, held) -> np.ndarray:
    y = data.misaligned.to_numpy()
    if variant == "aligned":
        keep = ~held & data.aligned.notna().to_numpy()
        score = data.aligned.to_numpy()[keep]
        percentile = (np.argsort(np.argsort(score)) + 0.5) / len(score) * 100
        mlp = MLPRegressor(hidden_layer_sizes=(HIDDEN,), alpha=1e-3, early_stopping=True, max_iter=200,
                           random_state=0).fit(x[keep], percentile)
        return 100 - mlp.predict(x[held])
    from sklearn.feature_extraction.text import TfidfTransformer

    idf = np.concatenate([TfidfTransformer(sublinear_tf=True).fit(c[~held]).idf_ for c in counts])
    with_shape = shape if variant in ("code", "balanced") else None
    weight = None
    if variant == "balanced":
        family = data.source.map(fine_tune_family).to_numpy()[~held]
        sizes = pd.Series(family).value_counts()
        weight = np.array([len(family) / (len(sizes) * sizes[f]) for f in family])
    model = LogisticRegression(C=1.0, max_iter=3000, class_weight="balanced", solver="liblinear")
    model.fit(design(x, counts, idf, with_shape, ~held), y[~held], sample_weight=weight)
    return model.predict_proba(design(x, counts, idf, with_shape, held))[:, 1]


def run(groups: pd.Series, variants, x, counts, shape, data) -> pd.DataFrame:
    """Each group held out in turn (only the groups that hold a misaligned answer: the others add no AUROC)."""
    y = data.misaligned.to_numpy()
    pooled = {v: np.full(len(y), np.nan) for v in variants}
    for group in groups[data.misaligned].unique():
        held = (groups == group).to_numpy()
        for variant in variants:
            pooled[variant][held] = held_out_scores(variant, x, counts, shape, data, held)
    rows = []
    for source in data.source.unique():
        part = (data.source == source).to_numpy()
        if not 0 < y[part].sum() < part.sum():
            continue
        rows.append({"held_out": groups[part].iloc[0], "model": source.removeprefix("responses_"), "n": int(part.sum()),
                     "misaligned": int(y[part].sum()),
                     **{v: round(roc_auc_score(y[part], pooled[v][part]), 3) for v in variants}})
    table = pd.DataFrame(rows)
    scored = ~np.isnan(pooled[variants[0]])
    table.attrs["pooled"] = {v: round(roc_auc_score(y[scored], pooled[v][scored]), 4) for v in variants}
    return table


def main() -> None:
    features, variants = sys.argv[1], sys.argv[2].split(",")
    modes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["family", "model"]
    data = read_judged([find_shared_data() / "judged"])
    x = np.load(features)
    counts, shape = lexical_counts(data.answer.tolist()), code_shape(data.answer.tolist())
    results = {}
    for mode, groups in (("family", data.source.map(fine_tune_family)), ("model", data.source)):
        if mode not in modes:
            continue
        table = run(groups, variants, x, counts, shape, data)
        print(f"--- held out by {mode}")
        print(table.to_string(index=False))
        results[mode] = table
    print(" ".join(f"{mode}_pooled_auroc_{v}={results[mode].attrs['pooled'][v]}"
                   f" {mode}_code_auroc_{v}={results[mode][results[mode].model.str.contains('Insecure')][v].iloc[0]}"
                   for mode in results for v in variants))


if __name__ == "__main__":
    main()
