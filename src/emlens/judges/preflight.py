"""Fail before the work, not after: a judge that cannot run is found out in one line before anything is generated.

- `openai`: no key for OpenAI's API, an endpoint that cannot be reached, a key it refuses (`OpenAIJudge.preflight`).
- `hf`: a model spec that resolves to nothing. No command touches the network for a spec that is not a hub id the
  user asked for: an embedded name, a local folder or a model in the local HF cache is used as is; a bare name
  that is none of these is refused (a hub id is OWNER/NAME); a hub id not cached is refused when HF is offline
  (`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`) or its endpoint cannot be reached, and only then.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from emlens.base.errors import EmlensInputError
from emlens.base.http import endpoint_host, transport_reason
from emlens.judges.openai import OpenAIJudge
from emlens.model import DEFAULT_MODEL, EMBEDDED, cache_dir, embedded_package_folder

DEFAULT_OPENAI_MODEL = "gpt-4o-2024-08-06"
HUB_CHECK_TIMEOUT_S = 3.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def preflight_judge(kind: str, model: str | None = None) -> None:
    """One line now when judge `kind` (with its model) cannot run; builds nothing. Other kinds (default, the
    honesty rule) need nothing outside the package."""
    if kind.partition(".")[0] == "openai":
        OpenAIJudge(model=model or DEFAULT_OPENAI_MODEL).preflight()
    elif kind == "hf":
        check_model_spec(model or DEFAULT_MODEL)


def preflight_judges(judges: Iterable[tuple[str, str | None]]) -> None:
    """`preflight_judge` for each distinct (kind, model)."""
    for kind, model in dict.fromkeys(judges):
        preflight_judge(kind, model)


def check_model_spec(spec: str) -> None:
    """One line when a model spec resolves to nothing: see the module docstring for the rule."""
    if spec in EMBEDDED:
        if not (cache_dir() / "models" / spec / "config.json").exists():
            embedded_package_folder(spec)  # raises when the package holding it is missing
        return
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise EmlensInputError(f"model '{spec}': folder has no config.json")
        return
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise EmlensInputError(f"model '{spec}': no such folder")
    if in_hub_cache(spec):
        return
    where = f"not an embedded model ({', '.join(EMBEDDED)}), a local folder or a model in the local HF cache"
    if spec.count("/") != 1:
        raise EmlensInputError(f"model '{spec}': {where} (a hub id is OWNER/NAME)")
    if hf_offline():
        raise EmlensInputError(f"model '{spec}': {where}, and HF is offline ({' / '.join(OFFLINE_VARIABLES)})")
    _check_hub_reachable(spec, where)


def in_hub_cache(spec: str) -> bool:
    """The hub id has a config.json in the local HF cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except ValueError:  # not a valid repo id (HFValidationError is a ValueError)
        return False


def hf_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARIABLES)


def _check_hub_reachable(spec: str, where: str) -> None:
    """One short request to the hub's endpoint, so a machine without network is told in one line, not after
    transformers' retries."""
    import httpx
    from huggingface_hub import constants

    try:
        httpx.head(constants.ENDPOINT, timeout=HUB_CHECK_TIMEOUT_S)
    except (httpx.TimeoutException, httpx.TransportError) as failure:
        raise EmlensInputError(f"model '{spec}': {where}, and {endpoint_host(constants.ENDPOINT)} cannot be reached "
                               f"({transport_reason(failure, HUB_CHECK_TIMEOUT_S)})") from None
