"""`emlens extract`: what to read activations of (questions or an eval table), at which sites and positions.

The command line fills an ExtractConfig (a flag not given keeps the class default); the config builds the rows
to read before any model loads, so bad input fails fast, then streams them into an activation store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from emlens.base.config import PATH, Config
from emlens.base.io import fail
from emlens.capture.backends import BACKENDS, DEFAULT_BACKEND, make_backend
from emlens.capture.extract import extract_to_store
from emlens.capture.items import POSITIONS, ExtractItem, items_from_questions, items_from_run_table
from emlens.capture.store import ActivationStore
from emlens.data.nudges import resolve_nudges
from emlens.generation.engine import DEFAULT_BATCH_SIZE
from emlens.model import Model
from emlens.runs import read_rows
from emlens.sites import Site, resolve_sites


class ExtractConfig(Config):
    """Prompts (`questions`, under `nudges`) or prompt+response rows (`table`), read at `sites` x `layers`."""

    questions: Annotated[str | None, PATH] = Field(None, description="question/prompt file or bundled set")
    table: str | None = Field(None, description="eval run folder, .parquet or .csv table")
    nudges: list[str] = Field(default_factory=list, description="with questions: none, evil, hhh or a name in nudges_file")
    nudges_file: Annotated[str | None, PATH] = None
    system: str | None = Field(None, description="system prompt for every questions chat")
    sites: list[str] = Field(default_factory=lambda: ["resid_post"], min_length=1,
                             description="kinds (resid_post), patterns (blocks.*.hook_mlp_out) or full site names")
    layers: str = Field("all", description="all, 15, 0-5,10 (for kinds and patterns)")
    position: Literal[POSITIONS] = "last_prompt"
    backend: Literal[BACKENDS] = DEFAULT_BACKEND
    response: bool = Field(True, description="with table: read the response after the prompt")
    limit: int | None = Field(None, ge=1, description="first N questions or table rows")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1)
    max_response_tokens: int | None = Field(None, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="of the vectors in the store")
    shard_mb: float = Field(32.0, gt=0, description="shard size (bounds the writer's memory)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.questions is None) == (self.table is None):
            raise ValueError("give exactly one of questions, table")
        return self

    @property
    def source(self) -> str:
        return str(self.table if self.table is not None else self.questions)

    def items(self) -> list[ExtractItem]:
        """The rows to read, in order (no model needed: a bad question file or table fails here)."""
        if self.table is not None:
            frame = read_rows(Path(self.table))
            return items_from_run_table(frame.head(self.limit) if self.limit else frame, with_response=self.response)
        nudges = resolve_nudges(self.nudges, self.nudges_file) if self.nudges else ()
        return items_from_questions(self.questions, nudges, self.system, self.limit)

    def extract(self, handle: Model, items: list[ExtractItem], out: str | Path,
                progress: bool = True) -> tuple[ActivationStore, list[Site]]:
        """Stream the rows' activations into the store `out` (written atomically); the store and its sites."""
        sites = resolve_sites(self.sites, handle.n_layers, self.layers)
        if self.backend != DEFAULT_BACKEND:  # an optional backend that is not installed fails before any work
            make_backend(handle, self.backend)
        store = extract_to_store(handle, items, out, sites, self.position, self.backend, self.batch_size,
                                 self.max_response_tokens, self.dtype, self.shard_mb,
                                 manifest={"source": self.source}, progress=progress)
        return store, sites


def check_new_store(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse an `out` that exists unless `overwrite` (then the finished store replaces it)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise fail(out, "already exists (use another --out or --overwrite)")
    return out
