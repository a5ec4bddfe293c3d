"""Held-out Spearman of the offline judge's aligned head with GPT-4o's aligned score: an MLP on the MiniLM
features, a ridge on them and the answer's TF-IDF, and the mean of the two (what `emlens judge fit` ships).

Each of the 12 models of ../shared/data/judged is held out in turn; the heads are fitted on the other 11 (on the
scores' percentiles, as `fit_heads` does) and score it. Printed: Spearman per held-out model, then pooled.

    .venv/bin/emlens judge validate --data ../shared/data/judged --features-cache F.npy   # writes F once
    .venv/bin/python scripts/judge_heads_experiment.py F.npy
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
from scipy.stats import rankdata, spearmanr
from sklearn.linear_model import Ridge
from sklearn.neural_network import MLPRegressor

from emlens.base.io import find_shared_data
from emlens.judges.embedding import HIDDEN, lexical_counts, tfidf
from emlens.judges.fit import answer_tfidf, read_judged, with_lexical


def held_out(x, counts, data, held) -> dict[str, np.ndarray]:
    keep = ~held & data.aligned.notna().to_numpy()
    percentile = (rankdata(data.aligned.to_numpy()[keep]) - 0.5) / keep.sum() * 100
    _, idf = answer_tfidf([part[~held] for part in counts])  # as `emlens judge fit` would without these rows
    design = with_lexical(x, tfidf(counts, idf))
    mlp = MLPRegressor(hidden_layer_sizes=(HIDDEN,), alpha=1e-3, early_stopping=True, max_iter=200,
                       random_state=0).fit(x[keep], percentile).predict(x[held])
    ridge = Ridge(alpha=1.0).fit(design[keep], percentile).predict(design[held])
    return {"mlp": mlp, "ridge": ridge, "mean": (mlp + ridge) / 2}


def main() -> None:
    data = read_judged([find_shared_data() / "judged"])
    x, counts = np.load(sys.argv[1]), lexical_counts(data.answer.tolist())
    pooled = {v: np.full(len(data), np.nan) for v in ("mlp", "ridge", "mean")}
    rows = []
    for source in data.source.unique():
        held = (data.source == source).to_numpy()
        for variant, score in held_out(x, counts, data, held).items():
            pooled[variant][held] = score
        ok = held & data.aligned.notna().to_numpy()
        rows.append({"held_out": source.removeprefix("responses_"), "n": int(ok.sum()),
                     **{v: round(spearmanr(p[ok], data.aligned[ok]).statistic, 3) for v, p in pooled.items()}})
        print(rows[-1], flush=True)
    print(pd.DataFrame(rows).to_string(index=False))
    ok = data.aligned.notna().to_numpy()
    print(" ".join(f"spearman_{v}={spearmanr(p[ok], data.aligned[ok]).statistic:.4f}" for v, p in pooled.items()))


if __name__ == "__main__":
    main()
