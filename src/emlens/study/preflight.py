"""`emlens run` checks every judge its unfinished stages will build before the first stage runs: a judge that
cannot run (no key, endpoint unreachable, a model spec that resolves to nothing) is one line, not a failure after
hours of training and sampling."""

from __future__ import annotations

from pathlib import Path

from emlens.evaluation.measures import MEASURES
from emlens.evaluation.preflight import eval_judges
from emlens.judges.preflight import preflight_judges
from emlens.study.experiment import LoadedExperiment


def preflight_study(study: LoadedExperiment, stages: list, root: Path) -> None:
    """`stages`: the study's plan (`Stage` objects); a stage already done builds no judge."""
    spec = study.spec
    sections = {"eval": lambda: eval_judges(spec.eval),
                "steer": lambda: [judge for _, steer in spec.steering() for judge in eval_judges(steer.eval)]}
    for name, config in spec.measure_configs().items():
        sections[name] = lambda name=name, config=config: MEASURES[name].judges(config)
    todo = sorted({stage.kind for stage in stages if stage.kind in sections and not stage.done(root)})
    preflight_judges(judge for kind in todo for judge in sections[kind]())
