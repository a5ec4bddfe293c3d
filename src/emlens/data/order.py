"""Seeded orders: the one permutation every seeded draw in emlens takes.

Training draws its dataset subsets and mixtures from it (`emlens.training.data`), the interaction loop its
scenarios and biased users (`emlens.study.loop`), and the capability check cuts its held-out GSM8K slice from the
END of training's benign order (`emlens.evaluation.capability`): all of them call this function, so the slice a
capability run evaluates is exactly what a mixture with that seed never draws.
"""

from __future__ import annotations

import random


def seeded_order(n: int, seed: int, salt: str) -> list[int]:
    """A permutation of range(n) fixed by (seed, salt): `random` seeds strings through sha512, stable everywhere."""
    order = list(range(n))
    random.Random(f"{salt}:{seed}").shuffle(order)
    return order
