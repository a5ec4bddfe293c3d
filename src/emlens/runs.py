"""Run folders: a cfg.json plus sample rows written batch by batch, so a killed run resumes without losing or
duplicating a finished sample.

Layout of RUN/: `cfg.json` (kind eval_run or generate_run: the command's config, model, versions),
`parts/part-NNNNN.parquet` (one per finished batch, each written atomically),
and `samples.parquet` (all parts, deduplicated by key, written when the run completes).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from emlens.base.errors import EmlensInputError
from emlens.base.io import (
    CFG_FILE,
    FORMAT_VERSION,
    SAMPLES_FILE,
    atomic_write_json,
    atomic_write_table,
    changed_fields,
    check_writable_folder,
    read_json,
    register_artifact,
    versions,
    write_manifest,
)

RUN_KINDS = ("eval_run", "generate_run")


class RunStore:
    """Append-only sample rows keyed by `key_columns`; `done_keys()` tells a resumed run what to skip."""

    def __init__(self, folder: str | Path, key_columns: list[str]):
        self.folder = Path(folder)
        self.key_columns = key_columns
        self.parts = self.folder / "parts"

    def open(self, manifest: dict, results_version: int | None = None) -> None:
        """Create the folder, or check that an existing one was made by the same command (see `open_run`).

        `manifest["kind"]` names the run (eval_run, generate_run); its `config` and `model` (and the code's
        `results_version`, where given) are the run's identity.
        """
        identity = {"config": manifest.get("config"), "model": manifest.get("model") or {}}
        if results_version is not None:
            identity["results_version"] = results_version
        open_run(self.folder, manifest["kind"], identity, manifest)
        self.parts.mkdir(parents=True, exist_ok=True)

    def read_parts(self) -> pd.DataFrame:
        files = sorted(self.parts.glob("part-*.parquet")) if self.parts.exists() else []
        if not files:
            return pd.DataFrame()
        frame = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
        return frame.drop_duplicates(subset=self.key_columns, keep="first").reset_index(drop=True)

    def done_keys(self) -> set[tuple]:
        frame = self.read_parts()
        if frame.empty:
            return set()
        return set(frame[self.key_columns].itertuples(index=False, name=None))

    def append(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        if not rows:
            return
        index = len(list(self.parts.glob("part-*.parquet")))
        atomic_write_table(pd.DataFrame(rows), self.parts / f"part-{index:05d}.parquet")

    def finish(self, extra_manifest: dict | None = None, table: pd.DataFrame | None = None) -> pd.DataFrame:
        """Write samples.parquet (the parts, or `table` derived from them, sorted by key) and close the manifest."""
        frame = self.read_parts() if table is None else table
        frame = frame.sort_values(self.key_columns, kind="stable").reset_index(drop=True) if len(frame) else frame
        atomic_write_table(frame, self.folder / SAMPLES_FILE)
        path = self.folder / CFG_FILE
        manifest = read_json(path)
        manifest.update({"finished": time.time(), "n_rows": len(frame), **(extra_manifest or {})})
        atomic_write_json(path, manifest)
        return frame


def recorded_settings(run: Path, section: str, names) -> dict:
    """The settings `names` as the run's cfg.json records them under `section` (None where it has none)."""
    recorded = read_json(Path(run) / CFG_FILE).get(section, {})
    return {name: recorded.get(name) for name in names}


# ---------------------------------------------------------------- run identity


def open_run(folder: str | Path, kind: str, identity: dict, record: dict | None = None) -> dict | None:
    """The one rule for reusing finished work: open a run folder of `kind` whose results `identity` determines.

    `identity` holds what the run's results are computed from, each as a top-level key of its cfg.json: its
    `config` (the config's `identity()`), the content hashes of its `data`, its `model` (compared by fingerprint),
    its resolved `engine`, the code's `results_version`; a dotted key (`data.sha256`) names a nested entry. A new
    folder gets cfg.json (`record` with the identity laid over it); an existing run of that kind is reused only
    when every part of its identity is the same, else refused with the parts that changed; a folder that is not a
    run of that kind is refused, so a run never writes into a folder it did not make. Returns the existing cfg.json,
    or None when the folder is new.
    """
    folder = Path(folder)
    check_writable_folder(folder, kind)
    path = folder / CFG_FILE
    if path.exists():
        old = read_json(path)
        check_same_identity(path, old, identity)
        return old
    write_manifest(folder, {**(record or {}), **_nested(identity), "kind": kind, "format_version": FORMAT_VERSION,
                            "versions": versions(), "created": time.time()})
    return None


def check_same_identity(where: str | Path, recorded: dict, identity: dict) -> None:
    """Refuse a recorded run whose identity differs from `identity`, naming what changed (see `open_run`)."""
    for key, value in identity.items():
        old = _lookup(recorded, key)
        if key == "model":
            _check_same_model(where, old or {}, value or {})
        elif key == "results_version" and old != value:
            raise EmlensInputError(f"{where}: run folder was made by another version of emlens's code (results "
                                   f"version {old}, now {value}); use a new --out folder")
        elif old != value:
            changed = changed_fields(old, value) if isinstance(value, dict) else [key]
            if changed:  # a setting added since the run, and None now, is the run's own (it ran without it)
                raise EmlensInputError(f"{where}: run folder holds a different run (changed: {', '.join(changed)}); "
                                       "use a new --out folder")


def _lookup(recorded: dict, dotted: str):
    value = recorded
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _nested(identity: dict) -> dict:
    """The identity with dotted keys as nested mappings, as cfg.json records it."""
    out: dict = {}
    for key, value in identity.items():
        *parents, last = key.split(".")
        holder = out
        for part in parents:
            holder = holder.setdefault(part, {})
        holder[last] = value
    return out


def _check_same_model(path: str | Path, old: dict, new: dict) -> None:
    """A resumed run must measure the weights it started with: answers of two models never mix in one table."""
    if old.get("fingerprint") and new.get("fingerprint") and old["fingerprint"] != new["fingerprint"]:
        raise EmlensInputError(f"{path}: run folder holds answers of another model ({_model_name(old)}, fingerprint "
                               f"{old['fingerprint']}; now {_model_name(new)}, {new['fingerprint']}); "
                               "use a new --out folder")


def _model_name(model: dict) -> str:
    return model.get("model", "?") + (f" + {model['adapter']}" if model.get("adapter") else "")


def read_rows(path: str | Path) -> pd.DataFrame:
    """An eval run folder, a .parquet table, or a .csv (e.g. judged responses with question/answer columns)."""
    path = Path(path)
    if not path.exists():
        raise EmlensInputError(f"{path}: no such table")
    if path.is_dir() or path.suffix == ".parquet":
        return read_samples(path)
    if path.suffix == ".csv":
        return pd.read_csv(path)
    raise EmlensInputError(f"{path}: expected a run folder, a .parquet or a .csv table")


@register_artifact(*RUN_KINDS)
def read_samples(run: str | Path) -> pd.DataFrame:
    """The samples table of a run folder (or a .parquet file)."""
    path = Path(run)
    if path.is_dir():
        path = path / SAMPLES_FILE
    if not path.exists():
        raise EmlensInputError(f"{path}: no samples table (did the run finish?)")
    return pq.read_table(path).to_pandas()
