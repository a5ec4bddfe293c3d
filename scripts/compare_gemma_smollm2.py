"""The refusal directions of SmolLM2-135M-Instruct and Gemma 3 270M (widths 576 and 640) compared by what they
read: each fitted on 32 + 32 of Arditi et al.'s harmful / harmless train instructions, both then read 32 + 32
others; per layer pair at matched depth, Spearman of the two projections beside the 95th percentile of |Spearman|
over 100 random direction pairs. Needs the gemma extra and ../shared/data.

    .venv/bin/python scripts/compare_gemma_smollm2.py
"""

import json

import emlens as em
from emlens.base.io import find_shared_data
from emlens.model import GEMMA_MODEL


def instructions(name: str, start: int, n: int) -> list[str]:
    rows = json.loads((find_shared_data() / "refusal" / f"refusal_direction_{name}_train.json").read_text())
    return [row["instruction"] for row in rows[start:start + n]]


def refusal_direction(model, harmful: list[str], harmless: list[str]):
    acts = em.activations(model, harmful + harmless, sites="resid_post")
    return em.fit_direction(acts, [1] * len(harmful) + [0] * len(harmless), method="diff_of_means", name="refusal")


def main() -> None:
    fit = instructions("harmful", 0, 32), instructions("harmless", 0, 32)
    held_out = instructions("harmful", 32, 32) + instructions("harmless", 32, 32)
    models = [em.load_model(spec, device="cpu") for spec in ("smollm2-135m-instruct", GEMMA_MODEL)]
    table = em.compare_models(*[(model, refusal_direction(model, *fit)) for model in models], held_out)
    print(table.to_string(index=False))
    best = table.loc[table.spearman.idxmax()]
    print(f"best_layer_smollm2={int(best.layer_a)} best_layer_gemma={int(best.layer_b)} "
          f"spearman={best.spearman:.3f} random_p95={best.random_p95:.3f} n={int(best.n)}")


if __name__ == "__main__":
    main()
