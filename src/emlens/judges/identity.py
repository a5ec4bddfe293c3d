"""A judge's identity known before it is built: what its numbers depend on, for the keys of finished work."""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

from emlens.base.io import CFG_FILE, content_hash, file_sha256, read_json
from emlens.judges.calibration import SHIPPED
from emlens.judges.embedding import EMBEDDER_PACKAGE
from emlens.judges.openai import OpenAIJudge
from emlens.model import DEFAULT_MODEL, folder_fingerprint, weights_identity


def judge_identity(kind: str, model: str | None = None, mode: str = "logprobs", samples: int = 5) -> dict:
    """The offline judge's weights (heads and embedder), an API judge's model and endpoint, a local LM judge's
    weights; the rule judge is its code. Nothing is loaded and no network is touched."""
    if kind == "default":
        return {"kind": kind, "heads": file_sha256(_default_judge_folder() / "weights.safetensors"),
                "settings": _default_judge_settings(), "embedder": _embedder_fingerprint()}
    if kind == "openai":
        judge = OpenAIJudge(**({"model": model} if model else {}), cache=None, mode=mode, samples=samples)
        return {"kind": kind, "model": judge.model, "base_url": judge.base_url, "id": judge.id}
    if kind == "hf":
        return {"kind": kind, "model": weights_identity(model or DEFAULT_MODEL)}
    return {"kind": kind}


def calibration_identity(kind: str) -> str | None:
    """The calibration a judge's rates are corrected with where emlens ships one (the default judge's): work that
    stores corrected figures (a steering stage's tables) is redone when it changes."""
    path = _default_judge_folder() / Path(SHIPPED).name
    return file_sha256(path) if kind == "default" and path.exists() else None


def _default_judge_folder() -> Path:
    return Path(str(resources.files("emlens") / "resources" / "judge"))


# what the default judge's cfg.json holds only to document it; everything else (its cut above all) shapes its labels
DOCUMENTATION = ("created", "validation", "refit_command", "threshold_rule")


def _default_judge_settings() -> str:
    """The default judge's cfg.json but its documentation: a new cut on the same weights labels other answers
    misaligned, so finished work judged under the old cut is not reused."""
    cfg = read_json(_default_judge_folder() / CFG_FILE)
    return content_hash({key: value for key, value in cfg.items() if key not in DOCUMENTATION})


def _embedder_fingerprint() -> str | None:
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None  # the judge cannot run; building it says so
    return folder_fingerprint(Path(next(iter(spec.submodule_search_locations))) / "model")
