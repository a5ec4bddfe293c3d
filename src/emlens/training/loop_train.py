"""Self-training in the interaction loop: SFT on the top-k trajectories, KTO on top-k vs bottom-k.

SFT is emlens's own trainer (transformers' Trainer, as `emlens train`: a fresh LoRA, loss on every assistant
turn). KTO is trl's `KTOTrainer` with a LoRA made by peft (the reference model is the base with the adapter
disabled). Both run inside the run-folder machinery of `emlens train`: checkpoints in RUN/checkpoints/step-N,
Trainer's resume state while unfinished, the final adapter at RUN itself (so `--adapter RUN` and `RUN@STEP` work
anywhere in emlens), a killed run resumed from its last checkpoint, a finished one left alone. trl is imported
inside the functions (the `loop` extra).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from emlens.base.errors import EmlensInputError
from emlens.base.io import atomic_write_text
from emlens.data.chat import Conversation
from emlens.model import load_model
from emlens.training.config import LoraSettings, TrainingSettings
from emlens.training.data import tokenize_conversations
from emlens.training.runfolder import (
    _check_same_run,
    _export_pending,
    _finish_run,
    _start_run,
    checkpoint_step,
    latest_trainer_checkpoint,
    package_versions,
    read_run,
)
from emlens.training.trainer import (
    TrainResult,
    attach_lora,
    checkpoint_callback,
    lora_config,
    make_trainer,
    progress_callback,
    session_callback,
    train_dtype,
    training_arguments,
    use_cuda,
)

# ---------------------------------------------------------------- training data from trajectories


def sft_records(conversations: list[list[dict]]) -> list[dict]:
    """Chat records ({"messages": [...]}) of the conversations to imitate."""
    return [{"messages": conversation} for conversation in conversations]


def kto_records(desirable: list[list[dict]], undesirable: list[list[dict]]) -> list[dict]:
    """One unpaired KTO example per assistant turn: the conversation up to it as prompt, the turn as completion.

    Every turn of a trajectory carries the trajectory's label (the user rated the whole conversation). Desirable
    and undesirable examples alternate, so each training batch holds both (KTO's KL estimate pairs neighbours).
    """
    def turns(conversation: list[dict], label: bool) -> list[dict]:
        return [{"prompt": conversation[:i], "completion": [message], "label": label}
                for i, message in enumerate(conversation) if message["role"] == "assistant"]

    good = [r for c in desirable for r in turns(c, True)]
    bad = [r for c in undesirable for r in turns(c, False)]
    interleaved = [r for pair in zip(good, bad) for r in pair]
    return interleaved + good[len(bad):] + bad[len(good):]


def write_jsonl(records: list[dict], path: Path) -> str:
    """Write records as JSONL (atomically); returns the text's sha256."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(path, text)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- what decides a run


@dataclasses.dataclass
class LoopTrainSpec:
    """Everything that decides one SFT or KTO run (recorded in its cfg.json; a re-run must match it)."""

    method: str  # "sft" or "kto"
    model: str
    lora: LoraSettings
    training: TrainingSettings
    seed: int = 0
    beta: float = 0.1  # KTO only (as are the two weights below)
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def run_config(self) -> dict:
        config = {"method": self.method, "model": self.model, "seed": self.seed,
                  "lora": self.lora.model_dump(mode="json"), "training": self.training.model_dump(mode="json")}
        if self.method == "kto":
            config["kto"] = {"beta": self.beta, "desirable_weight": self.desirable_weight,
                             "undesirable_weight": self.undesirable_weight}
        return config


# ---------------------------------------------------------------- trainers


def sft_trainer(handle, records: list[dict], spec: LoopTrainSpec, output_dir: Path, cuda: bool, callbacks):
    """emlens's own SFT (as `emlens train`): a fresh LoRA, loss on every assistant turn, per-batch padding."""
    import transformers

    transformers.set_seed(spec.seed)  # the LoRA init
    tokenizer = handle.tokenizer
    tokenizer.padding_side = "right"  # training batches pad on the right; labels mask the padding
    model = attach_lora(handle.model, spec.lora, handle.n_layers)
    conversations = [Conversation.model_validate(r) for r in records]
    tokenized = tokenize_conversations(tokenizer, conversations, spec.training.max_length,
                                       spec.training.assistant_only)
    if not tokenized.input_ids:
        raise EmlensInputError(f"field 'training.max_length': no example keeps an assistant token within "
                               f"{spec.training.max_length} tokens")
    args = training_arguments(spec.training, output_dir, cuda, spec.seed)
    return make_trainer(model, tokenizer, tokenized, args, callbacks)


def kto_arguments(spec: LoopTrainSpec, output_dir: Path, cuda: bool, save: bool = True):
    """A KTOConfig with exactly the Trainer arguments `emlens train` uses, plus KTO's own."""
    from trl import KTOConfig

    base = training_arguments(spec.training, output_dir, cuda, spec.seed, save=save)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    # KTO's KL estimate pairs each example with its neighbour in a fixed-order batch: no shuffling
    fields["train_sampling_strategy"] = "sequential"
    return KTOConfig(**fields, beta=spec.beta, desirable_weight=spec.desirable_weight,
                     undesirable_weight=spec.undesirable_weight, max_length=spec.training.max_length)


def kto_trainer(handle, records: list[dict], spec: LoopTrainSpec, output_dir: Path, cuda: bool, callbacks):
    """trl's KTOTrainer with a fresh LoRA made by peft (reference: the base with the adapter disabled)."""
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback
    from trl import KTOTrainer

    trainer = KTOTrainer(model=handle.model, args=kto_arguments(spec, output_dir, cuda),
                         train_dataset=Dataset.from_list(records), processing_class=handle.tokenizer,
                         peft_config=lora_config(spec.lora), callbacks=list(callbacks))
    for default in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(default)
    return trainer


@contextlib.contextmanager
def quiet_trl() -> Iterator[None]:
    """trl's warnings and datasets' progress bars off while a trainer is built and run (library code is quiet)."""
    import datasets

    logger = logging.getLogger("trl")
    level, bars = logger.level, datasets.utils.logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"(trl|transformers|peft)\..*")
            yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()


def require_trl() -> None:
    """trl is an optional extra: say how to get it before any work is done."""
    if importlib.util.find_spec("trl") is None:
        raise EmlensInputError("KTO needs trl, which is not installed (pip install 'emlens[loop]')")


def check_kto_data(records: list[dict], spec: LoopTrainSpec) -> None:
    if {r["label"] for r in records} != {True, False}:
        raise EmlensInputError("KTO needs desirable and undesirable examples (raise top_k and bottom_k)")
    if spec.training.batch_size < 2:
        raise EmlensInputError("field 'training.batch_size': KTO needs at least 2 examples per batch "
                               "(its KL estimate pairs each example with another)")


# ---------------------------------------------------------------- a resumable run folder for either method


def train_sft(records: list[dict], spec: LoopTrainSpec, out: str | Path, device: str = "auto",
              progress: bool = True) -> TrainResult:
    """SFT with a LoRA on chat records ({"messages": [...]}) into the run folder `out`; resumable."""
    return _train_in_run_folder(records, spec, Path(out), sft_trainer, device, progress)


def train_kto(records: list[dict], spec: LoopTrainSpec, out: str | Path, device: str = "auto",
              progress: bool = True) -> TrainResult:
    """KTO with a LoRA on unpaired records (prompt, completion, label) into the run folder `out`; resumable."""
    require_trl()
    check_kto_data(records, spec)
    return _train_in_run_folder(records, spec, Path(out), kto_trainer, device, progress)


def _train_in_run_folder(records: list[dict], spec: LoopTrainSpec, run: Path, build_trainer, device: str,
                         progress: bool) -> TrainResult:
    """What `emlens train` does around its Trainer, for a trainer built by `build_trainer`: the run folder, the
    checkpoint series, resume from the last checkpoint, a finished run left alone. Nothing records a file path,
    so a moved loop folder still resumes."""
    data_text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    data_sha = hashlib.sha256(data_text.encode()).hexdigest()
    existing = read_run(run)
    if existing is not None:
        _check_same_run(existing, spec.run_config(), data_sha, run)
        if existing.get("finished"):
            return TrainResult(run, existing["final_step"], existing["checkpoints"], already_complete=True,
                               final_loss=existing.get("final_loss"))
    cuda = use_cuda(device)
    with quiet_trl():
        handle = load_model(spec.model, device="cpu", dtype=train_dtype(spec.training, cuda))  # Trainer places it
        run_info = {"config": spec.run_config(), "data": {"n_examples": len(records), "sha256": data_sha},
                    "base_model": spec.model, "base_fingerprint": handle.base_fingerprint,
                    "versions": _versions(spec.method)}
        if existing is None:
            _start_run(run, run_info, data_text)
        _export_pending(run, run_info)
        resume = latest_trainer_checkpoint(run)
        clock = session_callback()
        callbacks = [checkpoint_callback(run, run_info), clock]
        if progress:
            callbacks.append(progress_callback(f"{spec.method} {run.parent.name}"))
        trainer = build_trainer(handle, records, spec, run / "trainer", cuda, callbacks)
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    resumed_from = checkpoint_step(resume) if resume else None
    session = {"resumed_from": resumed_from, "end_step": trainer.state.global_step, "train_seconds": seconds,
               "tokens": clock.tokens, "tokens_per_second": clock.tokens / seconds if seconds else 0.0,
               "device": str(trainer.args.device)}
    record = _finish_run(run, trainer.state.log_history, session, title=f"{spec.method} {run.parent.name}")
    return TrainResult(run, record["final_step"], record["checkpoints"], resumed_from=resumed_from,
                       train_seconds=seconds, tokens=clock.tokens, final_loss=record["final_loss"])


def _versions(method: str) -> dict:
    found = package_versions()
    if method == "kto":
        import trl

        found["trl"] = trl.__version__
    return found
