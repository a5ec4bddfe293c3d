"""`emlens diff BASE --adapter A [--adapter B ...] [--control C] [--direction DIR ...] --out DIR`, `em.diff`: what
each fine-tune changed (the computations are `emlens.analysis.diff`'s), with its controls built in.

Controls: the sham adapter (the first adapter with B = 0, built in memory) must reproduce the base model exactly,
and the run stops before writing anything if it does not; with a `control` adapter (a benign fine-tune such as
the secure-code LoRA) every quantity is also reported as adapter minus control, with a bootstrap CI over the unit
it is measured on (texts for the lens, token rows for KL, answer pairs for steering); the steering vector has a
random vector of the same norm beside it, every cosine the 95th percentile of random unit vectors' |cos|.

OUT/ holds cfg.json (kind model_diff: the settings, the base and every adapter's fingerprint, the texts' and the
table's hashes, the code's results version; the sham's max |logit difference|, the first-token measure),
parts/LABEL/ (each adapter's measurements, written whole, so a killed run resumes adapter by adapter),
adl.parquet (per adapter and layer: norm with CI, relative to the stream, logit-lens tokens, cosines with the given
directions), directions/LABEL (the lens as a direction artifact, for `emlens steer`), kl.parquet (every token's
KL), kl_top.md / kl_top.parquet (the highest-KL tokens in context), steer.parquet (per answer pair and condition),
weights.parquet and weights_cos.parquet, summary.parquet (every headline number with its CI), diff.png and
report.md.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from emlens.analysis.diff import (
    SHAM_TOLERANCE,
    SINK_RATIO,
    STEER_CONTRASTS,
    TokenRows,
    add_sham,
    all_token_kl,
    attach_adapters,
    boot_norm_difference,
    chat_rows,
    check_adapter_fits,
    first_token_ratio,
    first_tokens,
    kept_positions,
    kl_table,
    lens_rows,
    random_cos_quantile,
    resid_norm,
    resid_posts,
    sham_check,
    steering_layer,
    steering_rows,
    text_differences,
    top_kl_tokens,
    weight_tables,
)
from emlens.analysis.patching import PatchItem
from emlens.base.config import NOT_IDENTITY, PATH, Config
from emlens.base.errors import EmlensInputError
from emlens.base.io import (
    CFG_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    atomic_folder,
    atomic_write_json,
    atomic_write_table,
    atomic_write_text,
    check_writable_folder,
    fail,
    file_sha256,
    find_shared_data,
    finished,
    read_json,
    read_jsonl,
    read_table,
    register_artifact,
    validate,
    versions,
)
from emlens.base.stats import bootstrap_ci
from emlens.directions.artifact import Direction, DirectionConfig
from emlens.directions.lens import lens_record
from emlens.model import DEFAULT_MODEL, Model, folder_fingerprint, load_model
from emlens.runs import open_run
from emlens.study.diff_report import Member, diff_figure, kl_top_markdown, report_text
from emlens.study.patch import judged_pairs

DIFF_KIND = "model_diff"
PART_KIND = "model_diff_part"
RESULTS_VERSION = 1
DEFAULT_TEXT = "benign/alpaca_instructions_refusal_direction.json"  # Alpaca instructions: unrelated to any EM data
DEFAULT_TABLE = "judged/responses_Qwen2.5--7B-Instruct-bad_medical_advice.csv"  # as `emlens patch` reads
TEXT_FIELDS = ("text", "instruction", "prompt", "question", "content")
ADL_FILE = "adl.safetensors"


class DiffConfig(Config):
    """What to diff, on which data, at which sizes."""

    model: str = DEFAULT_MODEL
    adapters: list[Annotated[str, PATH]] = Field(min_length=1, description="the fine-tunes (folders or RUN@STEP)")
    control: Annotated[str | None, PATH] = Field(None, description="a benign adapter: every diff also as adapter "
                                                                   "minus control, with a CI")
    directions: list[Annotated[str, PATH]] = Field([], description="fitted direction artifacts to compare with")
    text: Annotated[str | None, PATH] = Field(None, description="unrelated texts for the lens (TXT lines, JSON, "
                                                                "JSONL; default: the shared data's Alpaca "
                                                                "instructions)")
    table: Annotated[str | None, PATH] = Field(None, description="judged CSV (question, answer, aligned, coherent) "
                                                                 "for KL and the answer pairs (default: the shared "
                                                                 "data's, as emlens patch)")
    n_texts: int = Field(64, ge=2, description="texts the lens averages")
    k: int = Field(5, ge=1, description="first tokens of each text")
    first_token: Literal["auto", "keep", "skip"] = Field("auto", description="skip each text's first token: auto = "
                                                                             "where it is an attention sink")
    rows: int = Field(16, ge=1, description="judged answers KL is read on")
    max_tokens: int = Field(64, ge=1, description="answer tokens kept for KL")
    pairs: int = Field(8, ge=2, description="misaligned / aligned answer pairs for the steering metric")
    pair_tokens: int = Field(48, ge=1, description="tokens kept of each paired answer")
    layer: int | None = Field(None, ge=0, description="steer at this layer (default: the middle layer, as the "
                                                      "diffing-toolkit)")
    steer_scale: float = Field(1.0, gt=0, description="the steering vector's norm, in multiples of the lens's own")
    top_singular: int = Field(4, ge=1, description="singular directions per module compared with directions")
    lens_top: int = Field(10, ge=1, description="logit-lens tokens each way")
    top_tokens: int = Field(20, ge=1, description="highest-KL tokens listed per adapter")
    context: int = Field(4, ge=0, description="tokens of context each side of a top-KL token")
    n_boot: int = Field(1000, ge=10)
    seed: int = 0
    batch_size: Annotated[int, NOT_IDENTITY] = Field(4, ge=1, description="rows per forward pass")


@dataclass
class Inputs:
    ids: torch.Tensor  # (texts, k + 1) first tokens
    rows: TokenRows  # KL rows
    row_meta: pd.DataFrame  # question, aligned per KL row
    items: list[PatchItem]  # answer pairs
    directions: dict[str, Direction]
    hashes: dict[str, str]


def diff(adapters: str | list[str], out: str | Path, model: str = DEFAULT_MODEL, control: str | None = None,
         directions: list[str] | tuple = (), device: str = "auto", progress: bool = False, **settings) -> dict:
    """Diff each adapter against `model` (and the control), into OUT; resumes a killed run. Returns what
    `em.load(OUT)` returns. `settings`: DiffConfig's fields (n_texts, k, rows, pairs, layer, ...)."""
    fields = {"model": model, "adapters": [adapters] if isinstance(adapters, str) else list(adapters),
              "control": control, "directions": list(directions), **settings}
    return run_diff(validate(DiffConfig, fields, "diff"), out, device=device, progress=progress)


def run_diff(cfg: DiffConfig, out: str | Path, device: str = "auto", progress: bool = False) -> dict:
    """Every check runs before OUT is written: adapters of another base, bad inputs, a sham that is not exact."""
    out = check_writable_folder(Path(out), DIFF_KIND)
    handle = load_model(cfg.model, device=device)
    if cfg.layer is not None and cfg.layer >= handle.n_layers:
        raise EmlensInputError(f"diff field 'layer': {cfg.layer} (the model has layers 0-{handle.n_layers - 1})")
    members = plan_members(handle, cfg)
    inputs = read_inputs(handle, cfg)
    handle = attach_adapters(handle, {m.peft: m.path for m in members})
    sham = checked_sham(handle, members[0], inputs, cfg)
    open_run(out, DIFF_KIND, run_identity(handle, cfg, members, inputs), {"paths": _paths(cfg, members)})
    base = resid_posts(handle, inputs.ids, None, text_batch(cfg), progress)
    first = first_token_policy(cfg, base)
    for member in members:
        if not finished(out / "parts" / member.label):
            write_part(out / "parts" / member.label, handle, member, cfg, inputs, base, first["skipped"], progress)
    summarise(out, handle, cfg, members, inputs, {"sham": sham, "first_token": first})
    return open_diff(out)


def checked_sham(handle: Model, first: Member, inputs: Inputs, cfg: DiffConfig) -> dict:
    """The first adapter with B = 0 against the base on every KL row; a run whose sham is not the base stops."""
    add_sham(handle, first.peft, first.path)
    sham = sham_check(handle, inputs.rows, cfg.batch_size)
    if not sham["max_abs_logit_diff"] <= SHAM_TOLERANCE:
        raise EmlensInputError(f"adapter '{first.path}': its sham (B = 0) does not reproduce the base model (max "
                               f"|logit difference| {sham['max_abs_logit_diff']:.3g} > {SHAM_TOLERANCE:g}; a DoRA or "
                               "other non-additive adapter?), so a diff would not measure the adapter alone")
    return sham


def first_token_policy(cfg: DiffConfig, base: torch.Tensor) -> dict:
    """Whether the lens leaves each text's first token out: measured (auto), or as told."""
    ratio = first_token_ratio(base)
    skip = cfg.first_token == "skip" or (cfg.first_token == "auto" and ratio > SINK_RATIO)
    return {"ratio": ratio, "skipped": skip, "threshold": SINK_RATIO, "policy": cfg.first_token}


def text_batch(cfg: DiffConfig) -> int:
    """Texts per forward pass of the lens: as many tokens as `batch_size` rows of KL (texts are k + 1 tokens
    long, a pass costs about the weights' read, so few long passes beat many short ones)."""
    return max(1, cfg.batch_size * (cfg.max_tokens + 64) // (cfg.k + 1))


# ---------------------------------------------------------------- inputs


def plan_members(handle: Model, cfg: DiffConfig) -> list[Member]:
    """The adapters, then the control, each checked against the base model and labelled uniquely."""
    found, labels = [], set()
    roles = [(a, "adapter") for a in cfg.adapters] + ([(cfg.control, "control")] if cfg.control else [])
    for index, (adapter, role) in enumerate(roles):
        path = check_adapter_fits(handle, adapter)
        label = _unique(member_label(path), labels)
        found.append(Member(label, role, path, folder_fingerprint(path), f"m{index}"))
    return found


def member_label(path: Path) -> str:
    """A folder-safe name: the adapter's folder, or RUN@STEP for a training run's checkpoint."""
    name = path.name
    if path.parent.name == "checkpoints":
        name = f"{path.parent.parent.name}@{name.removeprefix('step-')}"
    return re.sub(r"[^A-Za-z0-9_.@-]+", "-", name)


def _unique(label: str, taken: set) -> str:
    candidate, n = label, 2
    while candidate in taken:
        candidate, n = f"{label}-{n}", n + 1
    taken.add(candidate)
    return candidate


def read_inputs(handle: Model, cfg: DiffConfig) -> Inputs:
    text_path, table_path = _data_path(cfg.text, DEFAULT_TEXT, "text"), _data_path(cfg.table, DEFAULT_TABLE, "table")
    ids = first_tokens(handle, read_texts(text_path, cfg.n_texts * 4), cfg.k)[: cfg.n_texts]  # spares: short texts
    meta = kl_rows(table_path, cfg.rows)
    rows = chat_rows(handle, list(zip(meta.question, meta.answer, strict=True)), cfg.max_tokens)
    items = judged_pairs(table_path, cfg.pairs, cfg.pair_tokens, handle)
    directions = read_directions(handle, cfg.directions)
    hashes = {"text_sha256": file_sha256(text_path), "table_sha256": file_sha256(table_path),
              "directions": {name: file_sha256(d.path / WEIGHTS_FILE) for name, d in directions.items()}}
    return Inputs(ids, rows, meta[["question", "aligned"]].reset_index(drop=True), items, directions, hashes)


def _data_path(given: str | None, default: str, field: str) -> Path:
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise fail(path, f"no such file (diff field '{field}')")
        return path
    root = find_shared_data()
    if root is None or not (root / default).is_file():
        raise EmlensInputError(f"diff field '{field}': not given, and no shared data folder holds {default} (set "
                               f"EMLENS_SHARED_DATA, or pass --{field})")
    return root / default


def read_texts(path: Path, limit: int | None = None) -> list[str]:
    """Texts from a TXT (a line each), JSON (a list of strings or records), JSONL or CSV file; a record's text is
    its first field of TEXT_FIELDS, or a chat's first user message."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".jsonl":
        texts = [_text_of(record, where) for where, record in read_jsonl(path)]
    elif suffix == ".json":
        records = read_json(path)
        if not isinstance(records, list):
            raise fail(path, "expected a JSON list of texts or records")
        texts = [_text_of(record, f"{path} item {i}") for i, record in enumerate(records)]
    elif suffix == ".csv":
        frame = pd.read_csv(path)
        column = next((c for c in TEXT_FIELDS if c in frame.columns), None)
        if column is None:
            raise fail(path, f"no text column (one of {', '.join(TEXT_FIELDS)})")
        texts = frame[column].dropna().astype(str).tolist()
    else:
        raise fail(path, "texts are read from .txt, .json, .jsonl or .csv")
    if not texts:
        raise fail(path, "no texts")
    return texts[:limit]


def _text_of(record, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for name in TEXT_FIELDS:
            if isinstance(record.get(name), str) and record[name].strip():
                return record[name]
        users = [m.get("content") for m in record.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[0], str):
            return users[0]
    raise fail(where, f"no text (a string, or a record with one of {', '.join(TEXT_FIELDS)} or messages)")


def kl_rows(path: Path, rows: int) -> pd.DataFrame:
    """`rows` answers of a judged table, spread over its questions (each question's first answer, then its
    second, ...)."""
    table = pd.read_csv(path)
    missing = sorted({"question", "answer", "aligned"} - set(table.columns))
    if missing:
        raise fail(path, f"no column {', '.join(missing)} (a judged table has question, answer, aligned, coherent)")
    table = table.dropna(subset=["question", "answer"])
    spread = table.assign(_turn=table.groupby("question", sort=False).cumcount()).sort_values("_turn", kind="stable")
    return spread.head(rows).reset_index(drop=True)


def read_directions(handle: Model, paths: list[str]) -> dict[str, Direction]:
    found: dict[str, Direction] = {}
    for path in paths:
        direction = Direction.load(path)
        direction.check_compatible(handle)
        found[_unique(direction.name, set(found))] = direction
    return found


def run_identity(handle: Model, cfg: DiffConfig, members: list[Member], inputs: Inputs) -> dict:
    """What the results are computed from: the settings, the data's hashes, the base's and each adapter's
    fingerprint, the code's results version."""
    settings = cfg.identity(mode="json")
    for name in ("model", "adapters", "control", "directions", "text", "table"):
        settings.pop(name)
    return {"config": settings, "data": inputs.hashes, "results_version": RESULTS_VERSION,
            "model": {"model": handle.spec, "fingerprint": handle.base_fingerprint, "d_model": handle.d_model,
                      "n_layers": handle.n_layers},
            "adapters": {m.label: m.fingerprint for m in members if m.role == "adapter"},
            "control": {m.label: m.fingerprint for m in members if m.role == "control"} or None}


def _paths(cfg: DiffConfig, members: list[Member]) -> dict:
    return {"adapters": {m.label: str(m.path) for m in members}, "directions": cfg.directions,
            "text": cfg.text, "table": cfg.table}


# ---------------------------------------------------------------- one adapter's measurements


def write_part(folder: Path, handle: Model, member: Member, cfg: DiffConfig, inputs: Inputs, base: torch.Tensor,
               skip_first: bool, progress: bool) -> None:
    """The lens (per-text differences), KL, steering and weights of one adapter, written whole."""
    kept = kept_positions(cfg.k, skip_first)
    tuned = resid_posts(handle, inputs.ids, member.peft, text_batch(cfg), progress)
    differences, stream = text_differences(tuned, base, kept), resid_norm(tuned, kept)
    mean = differences.mean(0)
    layer = cfg.layer if cfg.layer is not None else steering_layer(handle.n_layers)
    kl = kl_table(handle, inputs.rows, all_token_kl(handle, inputs.rows, member.peft, cfg.batch_size, progress))
    steering = steering_rows(handle, inputs.items, member.peft, mean[layer], layer, cfg.steer_scale, cfg.seed,
                             cfg.batch_size, progress)
    norms, cosines = weight_tables(handle, member.peft, inputs.directions, cfg.top_singular)
    with atomic_folder(folder, PART_KIND) as tmp:
        save_file({"text_differences": differences.contiguous(), "stream_norm": stream.contiguous()}, tmp / ADL_FILE)
        for name, table in (("kl", kl), ("steer", steering), ("weights", norms), ("weights_cos", cosines)):
            atomic_write_table(table, tmp / f"{name}.parquet")
        atomic_write_json(tmp / CFG_FILE, {"kind": PART_KIND, "format_version": FORMAT_VERSION, "label": member.label,
                                           "role": member.role, "adapter": str(member.path),
                                           "fingerprint": member.fingerprint, "steering_layer": layer,
                                           "kept_positions": [kept.start, kept.stop], "versions": versions()})


@register_artifact(PART_KIND, whole=True)
def open_part(folder: str | Path) -> dict:
    """One adapter's measurements: cfg, per-text lens differences (texts, layers, d_model), the stream's norm per
    layer, and its KL, steering and weight tables."""
    folder = Path(folder)
    tensors = load_file(str(folder / ADL_FILE))
    return {"cfg": read_json(folder / CFG_FILE), **tensors,
            **{name: read_table(folder / f"{name}.parquet") for name in ("kl", "steer", "weights", "weights_cos")}}


# ---------------------------------------------------------------- the run's tables, figure and report


def summarise(out: Path, handle: Model, cfg: DiffConfig, members: list[Member], inputs: Inputs, checks: dict) -> None:
    parts = {m.label: open_part(out / "parts" / m.label) for m in members}
    control = next((m.label for m in members if m.role == "control"), None)
    adl = adl_frame(handle, cfg, members, parts, inputs.directions, control)
    for member in members:
        adl_direction(handle, cfg, member, parts[member.label], adl, inputs).save(out / "directions" / member.label)
    kl = pd.concat([parts[m.label]["kl"].assign(adapter=m.label, role=m.role) for m in members], ignore_index=True)
    kl = kl.merge(inputs.row_meta[["aligned"]], left_on="row", right_index=True, how="left")
    top = pd.concat([top_kl_tokens(handle, inputs.rows, kl[kl.adapter == m.label], cfg.top_tokens, cfg.context)
                     for m in members], ignore_index=True)
    tables = {"adl": adl, "kl": kl, "kl_top": top,
              "steer": _stacked(parts, members, "steer"), "weights": _stacked(parts, members, "weights"),
              "weights_cos": _stacked(parts, members, "weights_cos"),
              "summary": summary_frame(cfg, members, parts, adl, control)}
    for name, table in tables.items():
        atomic_write_table(table, out / f"{name}.parquet")
    atomic_write_text(out / "kl_top.md", kl_top_markdown(top))
    diff_figure(tables, members, out / "diff.png")
    cfg_path = out / CFG_FILE
    layers = [{"label": m.label, "role": m.role, "steering_layer": parts[m.label]["cfg"]["steering_layer"]}
              for m in members]
    record = {**read_json(cfg_path), **checks, "members": layers, "finished": time.time()}
    atomic_write_json(cfg_path, record)
    atomic_write_text(out / "report.md", report_text(out, cfg.model, cfg.steer_scale, record, tables, members))


def _stacked(parts: dict, members: list[Member], name: str) -> pd.DataFrame:
    return pd.concat([parts[m.label][name].assign(adapter=m.label, role=m.role) for m in members], ignore_index=True)


def adl_frame(handle: Model, cfg: DiffConfig, members: list[Member], parts: dict, directions: dict,
              control: str | None) -> pd.DataFrame:
    """Per adapter and layer: the lens's norm with a CI over texts, relative to the stream's norm, its logit-lens
    tokens, its cosine with each given direction and with the control's lens (beside the random null), and its norm
    minus the control's."""
    frames = []
    null = random_cos_quantile(handle.d_model)
    for member in members:
        differences = parts[member.label]["text_differences"]
        mean = differences.mean(0)
        norms = mean.norm(dim=-1)
        low, high = boot_norm_difference(differences, None, cfg.n_boot, cfg.seed)
        frame = pd.DataFrame(lens_rows(handle, mean, cfg.lens_top)).assign(
            adapter=member.label, role=member.role, norm=norms.numpy(), ci_low=low, ci_high=high,
            stream_norm=parts[member.label]["stream_norm"].numpy())
        frame["relative_norm"] = frame.norm / frame.stream_norm
        for name, direction in directions.items():
            frame[f"cos_{name}"] = [float(torch.nn.functional.cosine_similarity(mean[layer], direction.vector(layer),
                                                                                 dim=0))
                                    if layer in direction.layers and norms[layer] > 0 else np.nan
                                    for layer in frame.layer]
        frame["cos_null95"] = null
        if control is not None and member.role == "adapter":
            other = parts[control]["text_differences"]
            frame["cos_control"] = torch.nn.functional.cosine_similarity(mean, other.mean(0), dim=-1).numpy()
            frame["minus_control"] = (norms - other.mean(0).norm(dim=-1)).numpy()
            frame["minus_control_low"], frame["minus_control_high"] = boot_norm_difference(
                differences, other, cfg.n_boot, cfg.seed)
        frames.append(frame)
    first = ["adapter", "role", "layer", "norm", "ci_low", "ci_high", "stream_norm", "relative_norm"]
    table = pd.concat(frames, ignore_index=True)
    return table[first + [c for c in table.columns if c not in first]]


def adl_direction(handle: Model, cfg: DiffConfig, member: Member, part: dict, adl: pd.DataFrame,
                  inputs: Inputs) -> Direction:
    """The lens as a direction artifact: unit differences per layer, raw_norm = the difference's norm (so scale 1
    in a steering spec adds the mean difference itself), best layer = the one this run steered at."""
    mean = part["text_differences"].mean(0)
    norms = mean.norm(dim=-1)
    units = mean / norms.clamp_min(torch.finfo(mean.dtype).tiny)[:, None]
    rows = adl[adl.adapter == member.label]
    kept = part["cfg"]["kept_positions"]
    config = DirectionConfig(
        name=f"adl-{member.label}", method="activation_difference_lens", site_kind="resid_post",
        layers=list(range(handle.n_layers)), best_layer=part["cfg"]["steering_layer"],
        position=f"mean of positions {kept[0]}-{kept[1] - 1} of unrelated texts",
        description=f"mean resid_post(fine-tune) - resid_post(base) of adapter {member.path}",
        model={"model": handle.spec, "adapter": None, "fingerprint": handle.base_fingerprint,
               "base_fingerprint": handle.base_fingerprint, "n_layers": handle.n_layers, "d_model": handle.d_model},
        data={"text_sha256": inputs.hashes["text_sha256"], "n": int(part["text_differences"].shape[0]), "k": cfg.k},
        adapter={"path": str(member.path), "fingerprint": member.fingerprint}, versions=versions())
    metrics = rows[["layer", "norm", "relative_norm"]].rename(columns={"norm": "raw_norm"}).reset_index(drop=True)
    direction = Direction({"directions": units.float(), "raw_norm": norms.float(),
                           "layers": torch.arange(handle.n_layers)}, config, metrics=metrics)
    direction.cfg.lens = lens_record(handle, direction.vector(), direction.best_layer)  # as every fitted direction
    return direction


def unit_values(part: dict) -> dict[str, tuple[np.ndarray, np.ndarray | None, str]]:
    """The per-unit values each mean-type quantity averages: (values, clusters, unit). KL's tokens cluster by row
    (a row's tokens are not independent); steering contrasts are per answer pair."""
    kl = part["kl"]
    found = {f"kl_{group}": (kl[kl.part == group].kl.to_numpy(), kl[kl.part == group].row.to_numpy(), "rows")
             for group in ("prompt", "response")}
    wide = part["steer"].pivot(index="pair", columns="condition", values="metric")
    for name, (a, b) in STEER_CONTRASTS.items():
        if a in wide and b in wide:
            found[name] = ((wide[a] - wide[b]).to_numpy(), None, "pairs")
    return found


def summary_frame(cfg: DiffConfig, members: list[Member], parts: dict, adl: pd.DataFrame,
                  control: str | None) -> pd.DataFrame:
    """Every headline number: per adapter (and the control) its value with a 95 % CI, and for each adapter its
    difference from the control, paired by text, token row or answer pair."""
    rows = []
    for member in members:
        part = parts[member.label]
        layer = part["cfg"]["steering_layer"]
        at = adl[(adl.adapter == member.label) & (adl.layer == layer)].iloc[0]
        rows.append(_row(member, "adl_norm", at.norm, at.ci_low, at.ci_high, len(part["text_differences"]), "texts",
                         layer))
        total = float(np.sqrt((part["weights"].frobenius ** 2).sum()))
        rows.append(_row(member, "weights_frobenius", total, np.nan, np.nan, len(part["weights"]), "none"))
        for quantity, (values, clusters, unit) in unit_values(part).items():
            rows.append(_mean_row(member, quantity, values, clusters, unit, cfg))
        if control is not None and member.role == "adapter":
            rows += _control_rows(member, part, parts[control], at, cfg)
    return pd.DataFrame(rows)


def _row(member: Member, quantity: str, value, low, high, n: int, unit: str, layer: int | None = None,
         role: str | None = None) -> dict:
    return {"adapter": member.label, "role": role or member.role, "quantity": quantity, "layer": layer,
            "value": float(value), "ci_low": float(low), "ci_high": float(high), "n": int(n), "resampled": unit}


def _mean_row(member: Member, quantity: str, values: np.ndarray, clusters, unit: str, cfg: DiffConfig,
              role: str | None = None) -> dict:
    low, high = bootstrap_ci(values, n_boot=cfg.n_boot, seed=cfg.seed, clusters=clusters)
    n = len(np.unique(clusters)) if clusters is not None else len(values)
    return _row(member, quantity, np.mean(values) if len(values) else np.nan, low, high, n, unit, role=role)


def _control_rows(member: Member, part: dict, control: dict, at, cfg: DiffConfig) -> list[dict]:
    """Adapter minus control, paired (the same texts, tokens and pairs were read for both)."""
    rows = [_row(member, "adl_norm", at.minus_control, at.minus_control_low, at.minus_control_high,
                 len(part["text_differences"]), "texts", int(at.layer), role="minus_control")]
    total = np.sqrt((part["weights"].frobenius ** 2).sum()) - np.sqrt((control["weights"].frobenius ** 2).sum())
    rows.append(_row(member, "weights_frobenius", total, np.nan, np.nan, len(part["weights"]), "none",
                     role="minus_control"))
    theirs = unit_values(control)
    for quantity, (values, clusters, unit) in unit_values(part).items():
        if quantity in theirs and len(theirs[quantity][0]) == len(values):
            rows.append(_mean_row(member, quantity, values - theirs[quantity][0], clusters, unit, cfg,
                                  role="minus_control"))
    return rows


@register_artifact(DIFF_KIND)
def open_diff(folder: str | Path) -> dict:
    """`em.load(OUT)` of `emlens diff`: cfg, its tables (adl, kl, kl_top, steer, weights, weights_cos, summary),
    the lens directions by adapter, the figure and the report."""
    folder = Path(folder)
    cfg = read_json(folder / CFG_FILE)
    tables = {name: read_table(folder / f"{name}.parquet")
              for name in ("adl", "kl", "kl_top", "steer", "weights", "weights_cos", "summary")
              if (folder / f"{name}.parquet").exists()}
    directions = {m["label"]: Direction.load(folder / "directions" / m["label"]) for m in cfg.get("members", [])}
    return {"cfg": cfg, **tables, "directions": directions, "figure": folder / "diff.png",
            "report": folder / "report.md"}
