"""Held-out AUROC of candidate misaligned heads for the offline judge, per emergently misaligned model.

Each of the 12 models of ../shared/data/judged is held out in turn; a head is fitted on the other 11 and scores
it. Printed: the AUROC on each emergently misaligned model, and pooled over all held-out scores. Candidates: `logit` (the shipped head: logistic on the MiniLM features), `mlp` (one hidden layer), `lex` /
`both` (the MiniLM features plus hashed word 1-2-gram / and char 3-5-gram TF-IDF of the answer, logistic), and
`shipped` (the default judge's own head as `emlens judge fit` fits it: `both` with 2^16 hashed features per kind).

    .venv/bin/emlens judge validate --data ../shared/data/judged --features-cache F.npy   # writes F once
    .venv/bin/python scripts/judge_features_experiment.py F.npy logit,lex,both,mlp
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier

from emlens.base.io import find_shared_data
from emlens.judges.embedding import EmbeddingJudge, lexical_counts
from emlens.judges.fit import answer_tfidf, fit_misaligned_head, read_judged, with_lexical


def lexical(answers: pd.Series, kinds: list[str]) -> list:
    vectorizers = {"word": HashingVectorizer(n_features=2**18, ngram_range=(1, 2), alternate_sign=False, norm=None),
                   "char": HashingVectorizer(n_features=2**18, analyzer="char_wb", ngram_range=(3, 5),
                                             alternate_sign=False, norm=None)}
    return [vectorizers[kind].transform(answers) for kind in kinds]


def held_out_scores(variant: str, x, counts, y, held, answers, judge_counts) -> np.ndarray:
    if variant == "shipped":  # the default judge's own misaligned head, as `emlens judge fit` fits it
        lexical, idf = answer_tfidf([part[~held] for part in judge_counts])
        weights, _ = fit_misaligned_head(with_lexical(x[~held], lexical), y[~held], x.shape[1])
        weights["lexical.idf"] = idf
        judge = EmbeddingJudge({k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in weights.items()},
                               {"fingerprint": "experiment"})
        rows = torch.as_tensor(x[held], dtype=torch.float32)
        return judge.heads(rows, [answers[i] for i in np.flatnonzero(held)])["p_misaligned"]
    if variant == "mlp":
        model = MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, early_stopping=True, max_iter=200,
                              random_state=0).fit(x[~held], y[~held])
        return model.predict_proba(x[held])[:, 1]
    parts = {"logit": [], "lex": counts[:1], "both": counts}[variant]
    idf = [TfidfTransformer(sublinear_tf=True).fit(part[~held]) for part in parts]

    def design(rows):
        return sparse.hstack([sparse.csr_matrix(x[rows])] + [t.transform(p[rows]) for t, p in zip(idf, parts)]).tocsr()

    model = LogisticRegression(C=1.0, max_iter=3000, class_weight="balanced", solver="liblinear")
    return model.fit(design(~held), y[~held]).predict_proba(design(held))[:, 1]


def main() -> None:
    features, variants = sys.argv[1], sys.argv[2].split(",")
    data = read_judged([find_shared_data() / "judged"])
    x, y = np.load(features), data.misaligned.to_numpy()
    counts = lexical(data.answer, ["word", "char"])
    judge_counts = lexical_counts(data.answer.tolist()) if "shipped" in variants else None
    rows, pooled = [], {v: np.zeros(len(y)) for v in variants}
    for source in data.source.unique():  # every model held out in turn; the table shows the EM ones
        held = (data.source == source).to_numpy()
        row = {"held_out": source, "misaligned": int(y[held].sum()), "n": int(held.sum())}
        for variant in variants:
            pooled[variant][held] = held_out_scores(variant, x, counts, y, held, data.answer.tolist(),
                                                     judge_counts)
            row[variant] = round(roc_auc_score(y[held], pooled[variant][held]), 3) if 0 < y[held].sum() < held.sum() \
                else float("nan")
        if "bad_medical" in source or "Insecure" in source:
            rows.append(row)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    print(" ".join(f"min_em_auroc_{v}={table[v].min()} pooled_auroc_{v}={roc_auc_score(y, pooled[v]):.4f}"
                   for v in variants))


if __name__ == "__main__":
    main()
