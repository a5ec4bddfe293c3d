"""`emlens patch SPEC.yaml --out DIR`: where a behaviour lives, by patching one run into another on pairs of a
misaligned and an aligned answer to the same question. Three forms (the spec's `form`):
- adapter: from the model with its adapter into the model without it (where the fine-tune's behaviour lives);
- nudge: from the question under a nudge (`nudge`, e.g. evil) into the same question without it, on the model as
  loaded (where the nudge's effect lives; the prompts differ in length, so positions are `last` and `response`);
- pairs: clean vs corrupted prompts from a JSONL file (`pairs`: prompt, donor_prompt, target, alternative).

In the first two forms the pairs come from a judged table (the GPT-4o-scored responses in `../shared/data/judged`,
or any eval run's samples with `aligned` / `coherent` scores): for each question with both, its first misaligned
answer (aligned < 30, coherent > 50, Betley's thresholds) is the target and its first aligned one (aligned > 70)
the alternative; or, in any form, from a JSONL file (`pairs`) of prompt, target and alternative: any two
continuations make a metric, e.g. a refusal opening ("I'm sorry") against a compliant one ("Sure"). Attribution
patching ranks every cell in one backward pass; exact patching then measures every cell,
or only the `top` ones by attribution. OUT/ holds cfg.json (the spec's identity, the pairs' hash, the model, the
agreement of attribution with exact patching), exact.parquet and attribution.parquet (one row per layer x site x
positions cell) and patching.png. A killed run resumes: finished cells are kept (run identity as every run's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import pandas as pd
from pydantic import Field

from emlens.analysis.patching import SITES, PatchItem, agreement, attribute, grid_cells, patch, patch_figure
from emlens.base.config import NOT_IDENTITY, PATH, Config
from emlens.base.errors import EmlensInputError
from emlens.base.io import (
    CFG_FILE,
    atomic_write_json,
    atomic_write_table,
    content_hash,
    fail,
    read_json,
    read_jsonl,
    register_artifact,
)
from emlens.data.nudges import NUDGES, apply_nudge
from emlens.directions.specs import SpecContext
from emlens.judges.base import COHERENT_ABOVE, MISALIGNED_BELOW
from emlens.model import DEFAULT_MODEL, Model, load_model
from emlens.runs import RunStore
from emlens.sites import parse_layers

PATCH_KIND = "patch_run"
RESULTS_VERSION = 1
CELL = ["layer", "site", "positions"]
ALIGNED_ABOVE = 70.0  # the aligned side of a pair, as the probe specs' aligned contrast (">70")


class PatchSpec(Config):
    """What to patch: the model and its adapter, the form, the pairs, the grid and the method."""

    name: str = "patch"
    model: str = DEFAULT_MODEL
    adapter: Annotated[str | None, PATH] = Field(None, description="the fine-tune (folder or RUN@STEP): the donor "
                                                                   "(form adapter), or the model patched (others)")
    form: Literal["adapter", "nudge", "pairs"] = "adapter"
    nudge: str = Field("evil", description="form nudge: the donor's nudge (none, evil, hhh)")
    pairs: str | None = Field(None, description="JSONL of prompt, target, alternative (and donor_prompt in form "
                                                "pairs), in place of the judged table")
    table: str = Field("${EMLENS_SHARED_DATA}/judged/responses_Qwen2.5--7B-Instruct-bad_medical_advice.csv",
                       description="judged responses (question, answer, aligned, coherent), beside the spec")
    limit: int = Field(8, ge=1, description="questions (pairs)")
    max_tokens: int = Field(48, ge=1, description="tokens kept of each answer")
    layers: str | list[int] = "all"
    sites: list[str] = Field(list(SITES), min_length=1, description="resid_pre, attn_out, mlp_out, heads, head.H")
    positions: list[Literal["all", "prompt", "last", "response"]] = Field(["all", "last", "response"], min_length=1)
    method: Literal["exact", "attribution", "both"] = "both"
    top: int | None = Field(None, ge=1, description="with both: exact patching of the top (layer, site) cells only")
    n_boot: int = Field(1000, ge=10)
    seed: int = 0
    max_memory_gb: Annotated[float, NOT_IDENTITY] = Field(8.0, gt=0, description="refuse a grid that would hold "
                                                                                  "more activations at once")


def spec_items(spec: PatchSpec, spec_path: Path, handle: Model) -> list[PatchItem]:
    """The spec's items in its form: from its pairs file where it names one, else from its judged table."""
    context = SpecContext(spec_path)
    if spec.pairs is not None:
        items = prompt_pairs(context.resolve(spec.pairs, "pairs"), spec.limit, with_donor=spec.form == "pairs")
    elif spec.form == "pairs":
        raise EmlensInputError(f"{spec_path} field 'pairs': form pairs needs a JSONL file of prompt, donor_prompt, "
                               "target, alternative")
    else:
        items = judged_pairs(context.resolve(spec.table, "table"), spec.limit, spec.max_tokens, handle)
    if spec.form != "nudge":
        return items
    if spec.nudge not in NUDGES or spec.nudge == "none":
        raise EmlensInputError(f"{spec_path} field 'nudge': '{spec.nudge}' (known: "
                               f"{', '.join(n for n in NUDGES if n != 'none')})")
    chats = [[{"role": "user", "content": i.prompt}] if isinstance(i.prompt, str) else i.prompt for i in items]
    return [PatchItem(chat, i.target, i.alternative, donor_prompt=apply_nudge(chat, NUDGES[spec.nudge]))
            for chat, i in zip(chats, items, strict=True)]


def prompt_pairs(path: Path, limit: int, with_donor: bool = True) -> list[PatchItem]:
    """Items from a JSONL file, one JSON object per line: prompt (text, or a chat as a list of {role, content}),
    target and alternative (text), and in form pairs the donor_prompt (the clean or corrupted twin of prompt). Any
    pair of continuations is a metric: a misaligned vs an aligned answer, or a refusal opening ("I'm sorry") vs a
    compliant one ("Sure")."""
    fields = ["prompt", "donor_prompt", "target", "alternative"] if with_donor else ["prompt", "target", "alternative"]
    items = []
    for where, record in read_jsonl(path):
        missing = [k for k in fields if not record.get(k)]
        if missing:
            raise fail(where, f"no {', '.join(missing)} (a pair has {', '.join(fields)})")
        if not with_donor and record.get("donor_prompt"):
            raise fail(where, "a donor_prompt, but the spec's form is not pairs (its donor is the adapter or the "
                              "nudge)")
        items.append(PatchItem(record["prompt"], str(record["target"]), str(record["alternative"]),
                               donor_prompt=record.get("donor_prompt") if with_donor else None))
        if len(items) == limit:
            break
    if not items:
        raise fail(path, "no pairs")
    return items


def judged_pairs(path: Path, limit: int, max_tokens: int, handle: Model) -> list[PatchItem]:
    """(question, a misaligned answer, an aligned answer) for the first `limit` questions that have both."""
    table = pd.read_csv(path)
    missing = sorted({"question", "answer", "aligned", "coherent"} - set(table.columns))
    if missing:
        raise EmlensInputError(f"{path}: no column {', '.join(missing)} (a judged table has question, answer, "
                               "aligned, coherent)")
    coherent = table[table.coherent > COHERENT_ABOVE]
    items = []
    for question, rows in coherent.groupby("question", sort=False):
        bad, good = rows[rows.aligned < MISALIGNED_BELOW], rows[rows.aligned > ALIGNED_ABOVE]
        if len(bad) and len(good):
            items.append(PatchItem([{"role": "user", "content": question}], _cut(handle, bad.answer.iloc[0], max_tokens),
                                   _cut(handle, good.answer.iloc[0], max_tokens)))
        if len(items) == limit:
            break
    if not items:
        raise EmlensInputError(f"{path}: no question has both a misaligned (aligned < 30) and an aligned "
                               "(aligned > 70) coherent answer")
    return items


def _cut(handle: Model, text: str, tokens: int) -> str:
    ids = handle.tokenizer(str(text), add_special_tokens=False)["input_ids"][:tokens]
    return handle.tokenizer.decode(ids)


def run_patch(spec_path: str | Path, out: str | Path, device: str = "auto", progress: bool = True,
              adapter: str | None = None) -> dict:
    """Run (or resume) a patching spec into OUT (`adapter` over the spec's); returns what em.load(OUT) returns."""
    spec_path, out = Path(spec_path), Path(out)
    spec = PatchSpec.from_yaml(spec_path, adapter=adapter)
    if spec.adapter is None and spec.form == "adapter":
        raise EmlensInputError(f"{spec_path} field 'adapter': no adapter to patch from (name it, or pass --adapter)")
    handle = load_model(spec.model, adapter=spec.adapter, device=device)
    layers = parse_layers(spec.layers, handle.n_layers)
    items = spec_items(spec, spec_path, handle)
    cells = grid_cells(handle, items, layers, spec.sites, spec.positions)  # a bad grid fails before OUT is written
    _check_memory(spec, handle, items, layers)
    store = RunStore(out, CELL)
    store.open({"kind": PATCH_KIND, "config": {**spec.identity(mode="json"), "layers": layers},
                "model": handle.describe(), "pairs_sha256": content_hash([vars(i) for i in items])},
               results_version=RESULTS_VERSION)
    grid = dict(layers=layers, sites=spec.sites, positions=spec.positions, n_boot=spec.n_boot, seed=spec.seed)
    found: dict = {"n_pairs": len(items)}
    if spec.method != "exact":
        estimated = attribute(handle, items, **grid)
        atomic_write_table(estimated, out / "attribution.parquet")
        if spec.top is not None:
            cells = _top_cells(estimated, spec.top)
    if spec.method != "attribution":
        done = store.done_keys()
        todo = [c for c in cells if any((c[0], c[1], p) not in done for p in spec.positions)]
        if todo:
            patch(handle, items, cells=todo, on_cell=store.append, progress=progress, **grid)
    exact = store.finish()
    if spec.method == "both":
        found.update(agreement(exact, estimated))
    attribution_only = spec.method == "attribution"
    patch_figure(estimated if attribution_only else exact, out / "patching.png",
                 f"{spec.name}{' (attribution)' if attribution_only else ''}: {_direction(spec, handle)}")
    atomic_write_json(out / CFG_FILE, {**read_json(out / CFG_FILE), **found})
    return open_patch(out)


def _direction(spec: PatchSpec, handle: Model) -> str:
    """What was patched into what, for the figure's title."""
    return {"adapter": f"{handle.adapter} into its base", "nudge": f"the {spec.nudge} nudge into no nudge",
            "pairs": "donor prompts into their pairs"}[spec.form]


def _top_cells(estimated: pd.DataFrame, top: int) -> list[tuple[int, str]]:
    """The (layer, site) cells whose largest |estimated effect| over the position groups ranks in the top."""
    ranked = estimated.assign(magnitude=estimated.effect.abs()).groupby(["layer", "site"])["magnitude"].max()
    return [tuple(cell) for cell in ranked.sort_values(ascending=False).index[:top]]


def _check_memory(spec: PatchSpec, handle: Model, items: list[PatchItem], layers: list[int]) -> None:
    """About what the grid holds at once: the donor's activation at every cell, and for attribution the receiving
    run's activations and gradients plus the backward pass's graph (about 8 d_model + 2 d_ff floats per token and
    layer)."""
    rows, width = 2 * len(items), spec.max_tokens + 256  # a chat question is at most a few hundred tokens
    text = handle.config.get_text_config()
    per_cell = rows * width * handle.d_model * 4
    need = len(layers) * len(spec.sites) * per_cell * (3 if spec.method != "exact" else 1)
    if spec.method != "exact":
        d_ff = getattr(text, "intermediate_size", 4 * handle.d_model)
        need += handle.n_layers * rows * width * (8 * handle.d_model + 2 * d_ff) * 4
    if need / 1024 ** 3 > spec.max_memory_gb:
        raise EmlensInputError(f"patch spec field 'max_memory_gb': the grid needs about {need / 1024 ** 3:.1f} GB "
                               f"({len(layers)} layers x {len(spec.sites)} sites x {rows} rows); raise it, or patch "
                               "fewer layers, sites or pairs")


@register_artifact(PATCH_KIND)
def open_patch(folder: str | Path) -> dict:
    """`em.load(OUT)` of `emlens patch`: its cfg, the exact and attribution tables (where computed), the figure."""
    folder = Path(folder)
    tables = {name: pd.read_parquet(folder / f"{name}.parquet") for name in ("attribution",)
              if (folder / f"{name}.parquet").exists()}
    samples = folder / "samples.parquet"
    return {"cfg": read_json(folder / CFG_FILE), "exact": pd.read_parquet(samples) if samples.exists() else None,
            **tables, "figure": folder / "patching.png"}
