"""Reading and writing files: one-line errors naming the file and line or field, atomic writes, hashes.

Every reader raises EmlensInputError with a message that names the file and the line (JSONL, CSV, TXT) or
item and field (YAML, JSON), so the message alone says what to fix. Every writer is atomic: a file or folder
is written beside its target and renamed into place, so a killed command never leaves half an artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ValidationError

from emlens.base.errors import EmlensInputError
from emlens.base.version import __version__

PathLike = str | os.PathLike

# Artifact folders (SAELens style): a `cfg.json` naming the kind, and payload files named by these constants.
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "weights.safetensors"
METRICS_FILE = "metrics.parquet"
SAMPLES_FILE = "samples.parquet"
FORMAT_VERSION = 1


# ---------------------------------------------------------------- one-line errors


def fail(where: object, problem: str) -> EmlensInputError:
    """An input error whose message is one line: 'WHERE: PROBLEM'."""
    return EmlensInputError(f"{where}: {' '.join(problem.split())}")


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_validation_error(err: ValidationError) -> str:
    """A pydantic error as one line: "unknown field 'x'", "field 'a.0.b': msg (got ...)", joined by '; '."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown field '{loc}'")
        elif e["type"] == "missing":
            parts.append(f"missing field '{loc}'")
        elif loc:
            parts.append(f"field '{loc}': {message} (got {short_repr(e['input'])})")
        else:
            parts.append(f"{message} (got {short_repr(e['input'])})")
    return "; ".join(parts)


def validate(model: type[BaseModel], data: Any, where: object, context: dict | None = None) -> Any:
    """`model.model_validate(data, context=...)`, with a failure reported as one line naming `where`."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise fail(where, describe_validation_error(e)) from None


# ---------------------------------------------------------------- reading


def read_text(path: PathLike) -> str:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise fail(path, "file not found") from None
    except IsADirectoryError:
        raise fail(path, "is a folder, not a file") from None
    except OSError as e:
        raise fail(path, f"cannot read file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise fail(f"{path} line {line}", f"not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
    text = text.removeprefix("\ufeff")  # spreadsheet exports start CSVs with a BOM
    if not text.strip():
        raise fail(path, "empty file (no records)")
    return text


def parse_json(text: str, path: PathLike) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise fail(f"{path} line {e.lineno}", f"invalid JSON ({e.msg} at column {e.colno})") from None


def read_json(path: PathLike) -> Any:
    return parse_json(read_text(path), path)


def read_yaml(path: PathLike) -> Any:
    text = read_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path} line {mark.line + 1}" if mark else path
        raise fail(where, f"invalid YAML ({e.problem or e.context})") from None
    except yaml.YAMLError as e:
        raise fail(path, f"invalid YAML ({e})") from None
    if data is None:  # only comments
        raise fail(path, "empty file (no records)")
    return data


def read_yaml_mapping(path: PathLike, what: str) -> dict:
    """A YAML file whose top level must be a mapping (a config or spec)."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise fail(path, f"expected a mapping of {what} fields, got {type(data).__name__}")
    return data


def deep_merge(base: dict, update: dict) -> dict:
    """`update` laid over `base`, mapping by mapping (a nested mapping keeps the keys `update` does not name)."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def load_yaml_model(model: type[BaseModel], path: PathLike) -> Any:
    """A validated config or spec from a YAML file; every problem is one line naming the file and field."""
    return validate(model, read_yaml_mapping(path, model.__name__), path)


def read_jsonl(path: PathLike) -> Iterator[tuple[str, dict]]:
    """(where, record) per non-blank line; `where` is 'PATH line N'."""
    # split on "\n" only: str.splitlines would also split on U+2028, which is legal inside JSON strings
    for n, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise fail(where, f"invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise fail(where, f"expected a JSON object, got {type(record).__name__}")
        yield where, record


def read_table(path: PathLike) -> pd.DataFrame:
    """A Parquet file as a DataFrame, with a missing file reported in one line."""
    if not Path(path).is_file():
        raise fail(path, "no such file")
    return pq.read_table(path).to_pandas()


# ---------------------------------------------------------------- hashing


def file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise fail(path, "file not found") from None
    return digest.hexdigest()


def changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted names of the settings two configs (nested mappings) differ in, sorted; a setting one of them
    lacks counts as None there."""
    if isinstance(old, dict) and isinstance(new, dict):
        return sorted(name for key in set(old) | set(new)
                      for name in changed_fields(old.get(key), new.get(key), f"{prefix}{key}."))
    return [prefix.rstrip(".")] if old != new else []


def content_hash(value: Any, length: int = 16) -> str:
    """sha256 of a JSON-serialisable value (keys sorted), shortened."""
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# ---------------------------------------------------------------- atomic writes


def _temporary_beside(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_beside(path)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def json_text(value: Any) -> str:
    """How emlens writes JSON files (cfg.json and the rest)."""
    return json.dumps(value, indent=2, default=str) + "\n"


def atomic_write_json(path: PathLike, value: Any) -> None:
    atomic_write_text(path, json_text(value))


def atomic_write_table(frame: pd.DataFrame, path: PathLike) -> None:
    with atomic_file(path) as tmp:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)


def save_figure(fig: Any, path: PathLike, **options: Any) -> Path:
    """A matplotlib figure written atomically (a temporary file beside `path`, then renamed), in the format of
    `path`'s suffix (png when it has none); `options` go to `fig.savefig` (dpi, ...). Returns `path`."""
    path = Path(path)
    options.setdefault("format", path.suffix.lstrip(".").lower() or "png")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, **options)
    return path


def artifact_kind(folder: PathLike) -> str | None:
    """The `kind` in a folder's cfg.json (None when the folder is not an emlens artifact)."""
    cfg = Path(folder) / CFG_FILE
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("kind")
    except (json.JSONDecodeError, AttributeError):
        return None


def check_writable_folder(folder: PathLike, kind: str, force: bool = False) -> Path:
    """Refuse to replace a folder that is not an artifact of the same kind (unless forced).

    A command writes only into a new folder or over its own earlier output; it never deletes a user's folder.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise fail(folder, "exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        found = artifact_kind(folder)
        if found != kind:
            what = f"a '{found}' artifact" if found else "a folder that is not an emlens artifact"
            raise fail(folder, f"{what} is there; choose another output folder or pass --force to replace it")
    return folder


@contextlib.contextmanager
def atomic_folder(target: PathLike, kind: str, force: bool = False) -> Iterator[Path]:
    """Write an artifact folder atomically: yield a fresh sibling folder, then swap it in for `target`.

    `target`, if it exists, must be an artifact of the same `kind` (or `force`); it is replaced only after the
    new folder is complete, so a killed command leaves the old artifact (or nothing) in place.
    """
    target = check_writable_folder(target, kind, force)
    tmp = folder_beside(target)
    try:
        yield tmp
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def folder_beside(target: Path) -> Path:
    """A fresh hidden folder next to `target` (same file system, so it can be renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))


def swap_in(tmp: Path, target: Path) -> None:
    """Rename the finished folder `tmp` to `target`, replacing what is there only once `tmp` is complete."""
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.replace(target, old / target.name)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(folder: PathLike, manifest: dict, first_files: dict[str, str] | None = None) -> None:
    """Write FOLDER/cfg.json. A folder that does not exist yet appears with it, and with `first_files`, in one
    rename: a run killed at any moment leaves no folder or one its re-run recognises, never a folder of files
    without a cfg.json that every later run would refuse as not an emlens artifact. A folder the user made
    (empty: a mount point, a link to another disk) is written in place, never replaced."""
    folder = Path(folder)
    if folder.exists():
        if not (folder / CFG_FILE).exists():
            for name, text in (first_files or {}).items():
                atomic_write_text(folder / name, text)
        atomic_write_json(folder / CFG_FILE, manifest)
        return
    tmp = folder_beside(folder)
    try:
        for name, text in {**(first_files or {}), CFG_FILE: json_text(manifest)}.items():
            (tmp / name).write_text(text, encoding="utf-8")
        swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- provenance and paths


def versions() -> dict:
    import torch
    import transformers

    return {"emlens": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def find_shared_data(start: PathLike | None = None) -> Path | None:
    """EMLENS_SHARED_DATA, else the first `shared/data` folder walking up from `start` (default: the cwd)."""
    if os.environ.get("EMLENS_SHARED_DATA"):
        return Path(os.environ["EMLENS_SHARED_DATA"])
    here = Path(start or os.getcwd()).resolve()
    for parent in [here, *here.parents]:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return None


# ---------------------------------------------------------------- loading any artifact

ARTIFACT_LOADERS: dict[str, Any] = {}  # kind -> loader(folder); each artifact module registers its kinds
WHOLE_KINDS: set[str] = set()  # kinds written whole (atomic_folder): a folder of one is a finished artifact


def register_artifact(*kinds: str, whole: bool = False):
    """Decorator: `loader(folder)` opens artifacts whose cfg.json says one of `kinds` (for `em.load`). A kind has
    one loader: registering another for it is an error (the same function again, as on a module reload, is not).
    `whole`: the kind is only ever written whole, so its folder is finished as soon as it exists."""
    def decorate(loader):
        for kind in kinds:
            known = ARTIFACT_LOADERS.get(kind)
            if known is not None and _qualified(known) != _qualified(loader):
                raise ValueError(f"artifact kind '{kind}' is already opened by {_qualified(known)}; "
                                 f"{_qualified(loader)} cannot take it over")
            ARTIFACT_LOADERS[kind] = loader
            if whole:
                WHOLE_KINDS.add(kind)
        return loader
    return decorate


def finished(folder: PathLike) -> bool:
    """The one test of finished work: an artifact written whole, or a run whose cfg.json says `finished`
    (a run that is written piece by piece says so only when its last piece is in)."""
    path = Path(folder) / CFG_FILE
    if not path.is_file():
        return False
    cfg = read_json(path)
    return cfg.get("kind") in WHOLE_KINDS or bool(cfg.get("finished"))


def _qualified(function) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"


def load_artifact(path: PathLike) -> Any:
    """Open any emlens artifact folder by the `kind` in its cfg.json."""
    folder = Path(path)
    if not folder.is_dir():
        raise fail(folder, "no such artifact folder")
    if not (folder / CFG_FILE).is_file():
        raise fail(folder, f"not an emlens artifact (no {CFG_FILE})")
    kind = artifact_kind(folder)
    if kind not in ARTIFACT_LOADERS:
        raise fail(folder / CFG_FILE, f"unknown kind {kind!r} (known: {', '.join(sorted(ARTIFACT_LOADERS))})")
    return ARTIFACT_LOADERS[kind](folder)
