"""The activation store: safetensors shards and a Parquet index aligned to the items."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from emlens.base.errors import EmlensInputError
from emlens.base.io import (
    CFG_FILE,
    FORMAT_VERSION,
    atomic_write_json,
    atomic_write_table,
    check_writable_folder,
    folder_beside,
    read_json,
    register_artifact,
    swap_in,
    versions,
)

STORE_KIND = "activation_store"


# ---------------------------------------------------------------- the activation store


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ActivationStoreWriter:
    """Writes vectors shard by shard into a temporary folder that replaces `folder` only on `close()`.

    Each site has one preallocated shard buffer of `shard_mb / n_sites` MB that is filled in place and written
    when full, so the writer's memory is bounded by `shard_mb` whatever the number of rows.
    """

    def __init__(self, folder: str | Path, sites: list[str], d_model: int, manifest: dict,
                 dtype: str = "float32", shard_mb: float = 32.0, force: bool = False):
        if dtype not in _DTYPES:
            raise EmlensInputError(f"dtype '{dtype}': expected one of {', '.join(_DTYPES)}")
        self.folder = check_writable_folder(folder, STORE_KIND, force)
        self.tmp = folder_beside(self.folder)
        self.sites, self.d_model, self.manifest = list(sites), d_model, dict(manifest)
        self.dtype = dtype
        itemsize = torch.empty(0, dtype=_DTYPES[dtype]).element_size()
        self.capacity = max(1, int(shard_mb * 2**20) // (len(self.sites) * d_model * itemsize))  # vectors per shard
        self.buffer: dict[str, Tensor] | None = None  # allocated on first use (pages are touched as they fill)
        self.filled = 0
        self.index_rows: list[dict] = []
        self.n_vectors = 0  # written and buffered
        self.shard_starts: list[int] = []
        self.flushed_vectors = 0

    def add(self, rows_meta: list[dict], counts: list[int], vectors: dict[str, Tensor]) -> None:
        """Append a batch: one meta dict and vector count per row; `vectors[site]` has sum(counts) rows."""
        missing = set(self.sites) - set(vectors)
        if missing:
            raise RuntimeError(f"store: batch lacks sites {sorted(missing)}")
        n = sum(counts)
        if self.filled + n > self.capacity:
            self.flush()
        shard = len(self.shard_starts)
        for meta, count in zip(rows_meta, counts, strict=False):
            self.index_rows.append({**meta, "shard": shard, "vector_start": self.n_vectors, "n_vectors": count})
            self.n_vectors += count
        if n > self.capacity:  # one batch larger than a shard ('all' tokens of long rows): its own shard
            self._write({site: vectors[site].to(_DTYPES[self.dtype]).contiguous() for site in self.sites}, n)
            return
        if self.buffer is None:
            self.buffer = {site: torch.empty(self.capacity, self.d_model, dtype=_DTYPES[self.dtype])
                           for site in self.sites}
        for site in self.sites:
            self.buffer[site][self.filled:self.filled + n] = vectors[site]
        self.filled += n

    def _write(self, tensors: dict[str, Tensor], n: int) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(self.tmp / f"shard-{len(self.shard_starts):05d}.safetensors"))
        self.shard_starts.append(self.flushed_vectors)
        self.flushed_vectors += n

    def flush(self) -> None:
        if not self.filled:
            return
        self._write({site: buf[:self.filled] for site, buf in self.buffer.items()}, self.filled)
        self.filled = 0

    def close(self) -> ActivationStore:

        self.flush()
        index = pd.DataFrame(self.index_rows)
        if "row" in index.columns:
            index = index.sort_values("row", kind="stable").reset_index(drop=True)
        atomic_write_table(index, self.tmp / "index.parquet")
        manifest = {**self.manifest, "kind": STORE_KIND, "format_version": FORMAT_VERSION, "sites": self.sites,
                    "d_model": self.d_model, "dtype": self.dtype, "n_rows": len(index), "n_vectors": self.n_vectors,
                    "shards": [{"file": f"shard-{i:05d}.safetensors", "vector_start": s}
                               for i, s in enumerate(self.shard_starts)],
                    "versions": versions(), "created": time.time()}
        atomic_write_json(self.tmp / CFG_FILE, manifest)
        swap_in(self.tmp, self.folder)
        return ActivationStore(self.folder)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None:
            self.abort()


@register_artifact(STORE_KIND)
class ActivationStore:
    """Read a store: `.index` (one row per input row, in input order), `.load(site)` -> (vectors, d_model)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / CFG_FILE
        if not path.exists():
            raise EmlensInputError(f"{self.folder}: not an activation store (no {CFG_FILE})")
        self.manifest = read_json(path)
        if self.manifest.get("kind") != STORE_KIND:
            raise EmlensInputError(f"{path}: not an activation store (kind={self.manifest.get('kind')!r})")
        self.index = pd.read_parquet(self.folder / "index.parquet")

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def position(self) -> str:
        return self.manifest["position"]

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    def __len__(self) -> int:
        return len(self.index)

    def _check_site(self, site: str) -> None:
        if site not in self.sites:
            raise EmlensInputError(f"{self.folder}: no site '{site}' in this store (it has "
                                   f"{self.sites[0]} ... {self.sites[-1]}, {len(self.sites)} sites)")

    def load(self, site: str, rows: Sequence[int] | None = None) -> Float[Tensor, "vec d_model"]:
        """All vectors of one site in index order (or those of `rows`, positions in the index), as float32."""
        from safetensors import safe_open

        self._check_site(site)
        chunks = []
        for shard in self.manifest["shards"]:
            with safe_open(str(self.folder / shard["file"]), framework="pt") as f:
                chunks.append(f.get_tensor(site))
        flat = torch.cat(chunks).float() if chunks else torch.zeros(0, self.d_model)
        index = self.index if rows is None else self.index.iloc[list(rows)]
        starts, counts = index["vector_start"].to_numpy(), index["n_vectors"].to_numpy()
        if (counts == 1).all():
            return flat[torch.tensor(starts, dtype=torch.long)]
        return torch.cat([flat[s:s + c] for s, c in zip(starts, counts, strict=False)])

    def vector_rows(self, rows: Sequence[int] | None = None) -> Int[Tensor, " vec"]:
        """For each vector `load` returns, the position of its row in the index (token -> row for 'all')."""
        index = self.index if rows is None else self.index.iloc[list(rows)]
        counts = torch.tensor(index["n_vectors"].to_numpy(), dtype=torch.long)
        return torch.repeat_interleave(torch.arange(len(index)), counts)
