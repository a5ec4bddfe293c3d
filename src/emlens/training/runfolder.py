"""A training run folder: manifest, exported checkpoints (plain PEFT folders), loss table and figure."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd

from emlens.base.errors import EmlensInputError
from emlens.base.io import (
    CFG_FILE,
    FORMAT_VERSION,
    artifact_kind,
    atomic_file,
    atomic_folder,
    atomic_write_json,
    atomic_write_table,
    check_writable_folder,
    read_json,
    register_artifact,
    save_figure,
    versions,
    write_manifest,
)
from emlens.runs import check_same_identity

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

RUN_KIND, CHECKPOINT_KIND, SWEEP_KIND = "training_run", "adapter_checkpoint", "training_sweep"


def export_checkpoint(run: Path, source: Path, step: int, log_history: list[dict], epoch: float | None,
                      run_info: dict) -> Path:
    """Copy a Trainer checkpoint's adapter into RUN/checkpoints/step-N (atomically) with its manifest."""
    # Trainer also pickles its TrainingArguments next to the weights; resuming never reads it, and
    # emlens keeps no pickles.
    (source / "training_args.bin").unlink(missing_ok=True)
    folder = run / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    previous = max((s for s in _checkpoint_steps(run) if s < step), default=0)
    manifest = {"kind": CHECKPOINT_KIND, "format_version": FORMAT_VERSION, "step": step, "epoch": epoch,
                **_loss_window(log_history, step, previous), **run_info, "created": time.time()}
    target = folder / f"step-{step}"
    with atomic_folder(target, CHECKPOINT_KIND, force=True) as tmp:  # a re-export replaces its own checkpoint
        for name in ADAPTER_FILES:
            shutil.copyfile(source / name, tmp / name)  # copyfile, not copy2: safetensors saves files as 0600
        atomic_write_json(tmp / CFG_FILE, manifest)
    return target


def _checkpoint_steps(run: Path) -> list[int]:
    folder = Path(run) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name.split("-", 1)[1]) for p in folder.glob("step-*")
                  if p.name.split("-", 1)[1].isdigit() and (p / "adapter_config.json").exists())


def list_checkpoints(run: str | Path) -> list[dict]:
    """The checkpoint series of a run: step, path, `RUN@STEP` spec, loss, epoch; sorted by step."""
    run = Path(run)
    if read_run(run) is None and not (run / "checkpoints").is_dir():
        raise EmlensInputError(f"{run}: not a training run folder (no {CFG_FILE} of kind {RUN_KIND} or checkpoints/)")
    rows = []
    for step in _checkpoint_steps(run):
        path = run / "checkpoints" / f"step-{step}"
        manifest = read_json(path / CFG_FILE) if (path / CFG_FILE).exists() else {}
        rows.append({"step": step, "path": str(path), "spec": f"{run}@{step}", "loss": manifest.get("loss"),
                     "epoch": manifest.get("epoch"), "tokens_seen": manifest.get("tokens_seen")})
    return rows


def checkpoint_step(path: Path) -> int:
    """N of a Trainer `checkpoint-N` or an emlens `step-N` folder."""
    return int(path.name.split("-", 1)[1])


def latest_trainer_checkpoint(run: Path) -> Path | None:
    """The newest complete resume state (Trainer writes trainer_state.json last)."""
    folder = Path(run) / "trainer"
    complete = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").exists()
                and p.name.split("-", 1)[1].isdigit()] if folder.is_dir() else []
    return max(complete, key=checkpoint_step, default=None)


def _export_pending(run: Path, run_info: dict) -> None:
    """A kill between Trainer's save and our export leaves a resume state without its step-N folder."""
    latest = latest_trainer_checkpoint(run)
    if latest is None:
        return
    step = checkpoint_step(latest)
    if step not in _checkpoint_steps(run):
        state = json.loads((latest / "trainer_state.json").read_text())
        export_checkpoint(run, latest, step, state.get("log_history", []), state.get("epoch"), run_info)


# ---------------------------------------------------------------- run folder


def package_versions() -> dict:
    import accelerate
    import peft

    return {**versions(), "peft": peft.__version__, "accelerate": accelerate.__version__}


def read_run(run: Path) -> dict | None:
    """A training run's cfg.json (None when the folder holds no training run)."""
    return read_json(Path(run) / CFG_FILE) if artifact_kind(run) == RUN_KIND else None


def _check_same_run(existing: dict, new: dict, data_sha: str, run: Path, results_version: int | None = None) -> None:
    """A resumed run must have the config (`run_config()`), the data and the code it started with (`open_run`)."""
    identity = {"config": new, "data.sha256": data_sha}
    if results_version is not None:
        identity["results_version"] = results_version
    check_same_identity(run, existing, identity)


def _start_run(run: Path, run_info: dict, data_jsonl: str, **fields) -> None:
    """RUN/ with its cfg.json (the run's identity, `fields`, no sessions yet) and the exact training data."""
    check_writable_folder(run, RUN_KIND)
    write_manifest(run, {"kind": RUN_KIND, "format_version": FORMAT_VERSION, **run_info, **fields, "out": str(run),
                         "created": time.time(), "finished": False, "sessions": []}, {"data.jsonl": data_jsonl})


def _update_run(run: Path, **fields) -> dict:
    record = read_run(run) or {}
    record.update(fields)
    atomic_write_json(run / CFG_FILE, record)
    return record


def loss_table(log_history: list[dict]):
    import pandas as pd

    rows = [{"step": e["step"], "epoch": e.get("epoch"), "loss": e["loss"], "learning_rate": e.get("learning_rate"),
             "grad_norm": e.get("grad_norm"), "tokens_seen": e.get("num_input_tokens_seen")}
            for e in log_history if "loss" in e]
    return pd.DataFrame(rows, columns=["step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_seen"])


def plot_loss(frame, checkpoint_steps: list[int], path: Path, title: str) -> None:

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(frame["step"], frame["loss"], lw=0.8, alpha=0.5, label="loss per step")
    if len(frame) >= 5:
        ax.plot(frame["step"], frame["loss"].ewm(alpha=0.2).mean(), lw=1.6, label="smoothed (EMA 0.2)")
    for step in checkpoint_steps:
        ax.axvline(step, color="grey", lw=0.5, ls=":")
    ax.set(xlabel="optimizer step (dotted: checkpoints)", ylabel="training loss", title=title)
    ax.legend(frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _finish_run(run: Path, log_history: list[dict], session: dict, title: str) -> dict:
    frame = loss_table(log_history)
    atomic_write_table(frame, run / "loss.parquet")
    steps = _checkpoint_steps(run)
    if len(frame):
        plot_loss(frame, steps, run / "loss.png", title)
    final = run / "checkpoints" / f"step-{steps[-1]}"
    for name in ADAPTER_FILES:  # RUN itself is a PEFT folder of the final adapter
        with atomic_file(run / name) as tmp:
            shutil.copyfile(final / name, tmp)
    shutil.rmtree(run / "trainer", ignore_errors=True)  # resume state (optimizer...) is useless once finished
    sessions = [*(read_run(run) or {}).get("sessions", []), session]
    # one batch's loss is noisy: report the mean since the previous checkpoint (as the final manifest does)
    final_loss = read_json(final / CFG_FILE).get("loss")
    return _update_run(run, finished=True, final_step=steps[-1], checkpoints=steps, sessions=sessions,
                       final_loss=final_loss, last_step_loss=float(frame["loss"].iloc[-1]) if len(frame) else None,
                       updated=time.time())


def _loss_window(log_history: list[dict], step: int, previous: int) -> dict:
    losses = [e["loss"] for e in log_history if "loss" in e and previous < e.get("step", 0) <= step]
    last = next((e for e in reversed(log_history) if "loss" in e and e.get("step", 0) <= step), {})
    return {"loss": sum(losses) / len(losses) if losses else None, "loss_at_step": last.get("loss"),
            "learning_rate": last.get("learning_rate"), "tokens_seen": last.get("num_input_tokens_seen")}


@register_artifact(RUN_KIND)
def open_run(folder: Path) -> list[dict]:
    """`em.load(RUN)` of a training run: its checkpoint series (step, RUN@STEP spec, loss, ...)."""
    return list_checkpoints(folder)


@register_artifact(CHECKPOINT_KIND)
def open_checkpoint(folder: Path) -> dict:
    """`em.load(CHECKPOINT)` of an adapter checkpoint: its manifest (step, epoch, loss, ...) and `path`, the folder
    to pass as `adapter=` to `em.load_model`."""
    return {**read_json(Path(folder) / CFG_FILE), "path": str(Path(folder))}


@register_artifact(SWEEP_KIND)
def open_sweep(folder: Path) -> pd.DataFrame:
    """`em.load(SWEEP)` of a training sweep: one row per run (name, path, final step and loss where finished)."""
    runs = read_json(Path(folder) / CFG_FILE)["runs"]
    return pd.DataFrame([{k: v for k, v in run.items() if k != "config"} for run in runs])
