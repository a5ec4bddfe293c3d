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

    def open(self, manifest: dict) -> None:
        """Create the folder, or check that an existing one was made by the same command.

        `manifest["kind"]` names the run (eval_run, generate_run); a folder that is not a run of that kind is
        refused, so a run never writes into (or later replaces files of) a folder it did not make.
        """
        path = self.folder / CFG_FILE
        check_writable_folder(self.folder, manifest["kind"])
        if path.exists():
            old = read_json(path)
            if old.get("config") != manifest.get("config"):
                changed = changed_fields(old.get("config", {}), manifest.get("config", {}))
                raise EmlensInputError(f"{path}: run folder holds a different run (changed: {', '.join(changed)}); "
                                       "use a new --out folder")
            _check_same_model(path, old.get("model") or {}, manifest.get("model") or {})
        else:
            write_manifest(self.folder, {**manifest, "format_version": FORMAT_VERSION, "versions": versions(),
                                         "created": time.time()})
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


def _check_same_model(path: Path, old: dict, new: dict) -> None:
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
