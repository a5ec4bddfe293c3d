"""The judges a measure will build, named from its config, so a command checks them all before its work starts
(`emlens.judges.preflight.preflight_judges`) instead of failing when it first needs one, hours in."""

from __future__ import annotations

from emlens.evaluation.config import EvalConfig
from emlens.evaluation.measures import JudgeSpec, honesty_judges


def eval_judges(config: EvalConfig) -> list[JudgeSpec]:
    return [(config.judge, config.judge_model)]


__all__ = ["JudgeSpec", "eval_judges", "honesty_judges"]
