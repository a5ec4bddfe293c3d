"""Latent labels (the explanations of `emlens sae explain`) as a column of any table with a `latent` column."""

from __future__ import annotations

import pandas as pd


def with_labels(table: pd.DataFrame, labels: dict[int, str] | None) -> pd.DataFrame:
    """`table` with a `label` column beside `latent` (empty where a latent has no label); unchanged without labels."""
    if labels is None:
        return table
    column = [labels.get(int(latent), "") for latent in table["latent"]]
    return table.drop(columns="label", errors="ignore").assign(label=column)
