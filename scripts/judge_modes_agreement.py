"""Agreement of the openai judge's logprob-free modes with its logprob mode, on one real server.

    .venv/bin/python scripts/judge_modes_agreement.py [--n 60] [--samples 5] [--base-url URL --model NAME]
        [--verbal-max-tokens 32]

Without --base-url the embedded model is served by llama.cpp's server on loopback. The answers are the first
--n rows (spread over every file) of ../shared/data/judged; each is judged for `aligned` and `coherent` in the
logprobs, sampled and verbal modes. Printed per mode: the share of unparsed scores, Spearman of `aligned` with
the logprob mode over the rows both scored (n), and Cohen's kappa of the misaligned label (rows both labelled).
The last line is key=value.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr
from sklearn.metrics import cohen_kappa_score

from emlens.bench.judge import llama_server
from emlens.judges.base import DEFAULT_TEMPLATES, fill_template, label
from emlens.judges.openai import OpenAIJudge

JUDGED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "judged"


def answers(n: int) -> pd.DataFrame:
    files = sorted(JUDGED.glob("*.csv"))
    per_file = -(-n // len(files))
    return pd.concat([pd.read_csv(f).head(per_file) for f in files], ignore_index=True).head(n)


def judged(judge: OpenAIJudge, rows: pd.DataFrame) -> pd.DataFrame:
    scores = {metric: judge.score([fill_template(metric, DEFAULT_TEMPLATES[metric], q, a)
                                   for q, a in zip(rows.question, rows.answer, strict=True)])
              for metric in ("aligned", "coherent")}
    return pd.DataFrame({"aligned": [s.value for s in scores["aligned"]],
                         "coherent": [s.value for s in scores["coherent"]],
                         "label": [label(a.value, c.value, a.verdict)
                                   for a, c in zip(scores["aligned"], scores["coherent"], strict=True)]})


def agreement(reference: pd.DataFrame, other: pd.DataFrame) -> dict:
    both = reference.aligned.notna() & other.aligned.notna()
    rho = spearmanr(reference.aligned[both], other.aligned[both]).statistic if both.sum() > 2 else float("nan")
    labelled = reference.label.isin(["aligned", "misaligned"]) & other.label.isin(["aligned", "misaligned"])
    kappa = (cohen_kappa_score(reference.label[labelled], other.label[labelled])
             if labelled.sum() > 1 and reference.label[labelled].nunique() + other.label[labelled].nunique() > 2
             else float("nan"))
    return {"spearman": round(float(rho), 3), "n": int(both.sum()), "kappa": round(float(kappa), 3),
            "kappa_n": int(labelled.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--base-url")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--verbal-max-tokens", type=int, default=32,
                        help="a reasoning model needs its default (1024); the embedded model answers at once")
    args = parser.parse_args()
    rows = answers(args.n)
    with contextlib.ExitStack() as stack:
        base_url = args.base_url
        if base_url is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="emlens-modes-")))
            base_url = stack.enter_context(llama_server(folder / "server.log"))
        limits = {"verbal": args.verbal_max_tokens}
        results = {mode: judged(OpenAIJudge(model=args.model, base_url=base_url, cache=None, mode=mode,
                                            samples=args.samples, max_tokens=limits.get(mode)), rows)
                   for mode in ("logprobs", "sampled", "verbal")}
    summary = {"n_answers": len(rows)}
    for mode, table in results.items():
        unparsed = float(table.aligned.isna().mean())
        line = {"unparsed_aligned": round(unparsed, 3)}
        if mode != "logprobs":
            line.update(agreement(results["logprobs"], table))
        print(f"{mode}: " + " ".join(f"{k}={v}" for k, v in line.items()))
        summary.update({f"{mode}_{k}": v for k, v in line.items()})
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
