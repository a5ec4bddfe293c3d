"""Training stage: LoRA fine-tuning with transformers' `Trainer` into a series of plain PEFT checkpoints.

A run folder RUN/ holds:
  cfg.json                          kind training_run: config, data summary and hash, base model and fingerprint,
                                    versions, progress
  data.jsonl                        the exact training conversations (after limit / mixture sampling)
  checkpoints/step-N/               a plain PEFT adapter + cfg.json (kind adapter_checkpoint: step, loss, ...),
                                    every `save_steps` and at the end
  adapter_config.json, adapter_model.safetensors
                                    the final adapter, so RUN itself loads as a PEFT folder (`--adapter RUN`)
  loss.parquet, loss.png            the per-step training loss
  trainer/checkpoint-N/             Trainer's resume state (optimizer, scheduler, RNG) of the last checkpoint, kept
                                    only while the run is unfinished

`emlens.model.resolve_adapter("RUN@N")` maps to RUN/checkpoints/step-N. Re-running the same config on the same
folder resumes from the last checkpoint (Trainer's `resume_from_checkpoint`); a finished run is left alone.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from emlens.base.errors import EmlensInputError
from emlens.model import load_model
from emlens.training.config import (
    LoraSettings,
    TrainConfig,
    TrainingSettings,
    naming_the_config,
)
from emlens.training.data import (
    IGNORE_INDEX,
    TokenizedData,
    TrainingData,
    _SourceCache,
    build_training_data,
    tokenize_conversations,
)
from emlens.training.runfolder import (
    _check_same_run,
    _export_pending,
    _finish_run,
    _start_run,
    checkpoint_step,
    export_checkpoint,
    latest_trainer_checkpoint,
    package_versions,
    read_run,
)

RESULTS_VERSION = 2  # bump when a change alters what a training run holds: `emlens run` then redoes finished stages
# 2: a run that first converted the embedded model drew its LoRA init from a generator the conversion had advanced


# ---------------------------------------------------------------- model, LoRA and Trainer arguments


def use_cuda(device: str = "auto") -> bool:
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise EmlensInputError(f"device '{device}': training takes auto, cpu or cuda (choose GPUs with "
                               "CUDA_VISIBLE_DEVICES, or several with accelerate launch)")
    if device == "cpu":
        return False
    if device == "cuda" and not torch.cuda.is_available():
        raise EmlensInputError(f"device '{device}': CUDA is not available here")
    return torch.cuda.is_available()


def train_dtype(settings: TrainingSettings, cuda: bool) -> str:
    # bf16 only where the hardware has it: on CPUs without AVX512-BF16 it is emulated and ~16x slower.
    if settings.dtype == "auto":
        return "bfloat16" if cuda else "float32"
    return settings.dtype


def lora_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=settings.target_modules, layers_to_transform=settings.layers_to_transform,
                      use_rslora=settings.use_rslora, task_type="CAUSAL_LM")


def attach_lora(model, settings: LoraSettings, n_layers: int):
    """A fresh PEFT LoRA on `model`; bad target modules or layers are reported by their config field."""
    from peft import get_peft_model

    bad = [layer for layer in settings.layers_to_transform or [] if layer >= n_layers]
    if bad:
        raise EmlensInputError(f"field 'lora.layers_to_transform': layers {bad} out of range "
                               f"(the model has {n_layers} layers, 0-{n_layers - 1})")
    try:
        with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, lora_config(settings))
    except ValueError as error:
        raise EmlensInputError(f"field 'lora.target_modules': {str(error).splitlines()[0]}") from None


def training_arguments(settings: TrainingSettings, output_dir: Path, cuda: bool, seed: int, save: bool = True):
    from transformers import TrainingArguments

    checkpointing = cuda if settings.gradient_checkpointing is None else settings.gradient_checkpointing
    # transformers renamed gradient_checkpointing to activation_checkpointing (old name deprecated)
    name = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    checkpoint_args = {f"{name}_checkpointing": checkpointing,
                       f"{name}_checkpointing_kwargs": {"use_reentrant": False} if checkpointing else None}
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        bf16=train_dtype(settings, cuda) == "bfloat16",
        use_cpu=not cuda,
        **checkpoint_args,
        logging_steps=1,
        save_strategy="steps" if save else "no",
        save_steps=settings.save_steps,
        save_total_limit=1,  # the resume state; the checkpoint series lives in RUN/checkpoints
        seed=seed,
        data_seed=seed,
        include_num_input_tokens_seen="non_padding",
        report_to=[],
        disable_tqdm=True,  # our own bar (loss in the postfix instead of a dict printed every step)
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every forward pass
    )


def data_collator(tokenizer):
    from transformers import DataCollatorForSeq2Seq

    # pads per batch (to its longest row) and pads labels with IGNORE_INDEX
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)


def make_trainer(model, tokenizer, tokenized: TokenizedData, args, callbacks=()):
    from transformers import PrinterCallback, ProgressCallback, Trainer

    trainer = Trainer(model=model, args=args, train_dataset=tokenized.dataset(),
                      data_collator=data_collator(tokenizer), callbacks=list(callbacks))
    for default in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(default)
    return trainer


# ---------------------------------------------------------------- callbacks


def progress_callback(desc: str):
    from tqdm import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """A step bar with ETA; the latest loss in its postfix. Starts at the resumed step."""

        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=desc, unit="step",
                                dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Progress()


def session_callback():
    from transformers import TrainerCallback

    class SessionTokens(TrainerCallback):
        """Non-padding tokens trained in this session (a resumed run starts from the checkpoint's count)."""

        tokens = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = state.num_input_tokens_seen

        def on_train_end(self, args, state, control, **kwargs):
            self.tokens = state.num_input_tokens_seen - self.start

    return SessionTokens()


def checkpoint_callback(run: Path, run_info: dict):
    from transformers import TrainerCallback

    class ExportCheckpoints(TrainerCallback):
        """After Trainer saves its resume state, copy the adapter to RUN/checkpoints/step-N with a manifest."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                source = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                export_checkpoint(run, source, state.global_step, state.log_history, state.epoch, run_info)

    return ExportCheckpoints()


# ---------------------------------------------------------------- checkpoints


# ---------------------------------------------------------------- training


@dataclass
class TrainResult:
    run: Path
    final_step: int
    checkpoints: list[int]
    already_complete: bool = False
    resumed_from: int | None = None
    train_seconds: float = 0.0
    tokens: int = 0  # non-padding tokens processed in this session
    final_loss: float | None = None  # mean training loss over the steps since the previous checkpoint
    main_process: bool = True  # False on the other ranks of a distributed run (they write nothing)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else 0.0


def train(config: TrainConfig, out: str | Path, *, device: str = "auto", progress: bool = True,
          callbacks: tuple = (), echo: Callable[[str], None] | None = None,
          cache: _SourceCache | None = None) -> TrainResult:
    """Train one LoRA adapter into the run folder `out`; resume it if a previous session was killed.

    Everything that can fail on user input (config, data files, mixture sizes, LoRA targets and layers) is
    checked before the run folder is created. Under `accelerate launch` / torchrun every process runs this;
    only rank 0 writes.
    """
    run = Path(out)
    with naming_the_config(config):
        data = build_training_data(config, cache)
    existing = read_run(run)
    if existing is not None:
        _check_same_run(existing, config.run_config(), data.sha256, run, RESULTS_VERSION)
        if existing.get("finished"):
            return TrainResult(run, existing["final_step"], existing["checkpoints"], already_complete=True,
                               final_loss=existing.get("final_loss"))
    cuda = use_cuda(device)
    with naming_the_config(config):
        model, tokenizer, tokenized, run_info = _prepare_model_and_data(config, data, cuda)
    args = training_arguments(config.training, run / "trainer", cuda, config.seed)
    with args.main_process_first(local=False, desc="prepare the run folder"):
        if args.should_save:
            if existing is None:
                _start_run(run, run_info, data.jsonl(), results_version=RESULTS_VERSION, tokens={
                    "n_examples": len(tokenized.input_ids), "n_tokens": tokenized.n_tokens,
                    "n_trained_tokens": tokenized.n_trained_tokens, "n_truncated": tokenized.n_truncated,
                    "n_dropped": tokenized.n_dropped})
            _export_pending(run, run_info)
    resume = latest_trainer_checkpoint(run)
    clock = session_callback()
    ours = [checkpoint_callback(run, run_info), clock] + ([progress_callback(f"train {run.name}")] if progress else [])
    trainer = make_trainer(model, tokenizer, tokenized, args, [*ours, *callbacks])
    if echo and resume is not None and args.should_save:
        echo(f"resuming {run} from step {checkpoint_step(resume)}")
    start = time.perf_counter()
    with warnings.catch_warnings():  # Trainer and peft read transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds, tokens = time.perf_counter() - start, clock.tokens
    resumed_from = checkpoint_step(resume) if resume else None
    session = {"resumed_from": resumed_from, "end_step": trainer.state.global_step, "train_seconds": seconds,
               "tokens": tokens, "tokens_per_second": tokens / seconds, "device": str(args.device),
               "world_size": args.world_size}
    if not args.should_save:
        return TrainResult(run, trainer.state.global_step, [], resumed_from=resumed_from, train_seconds=seconds,
                           tokens=tokens, main_process=False)
    record = _finish_run(run, trainer.state.log_history, session, title=run.name)
    return TrainResult(run, record["final_step"], record["checkpoints"], resumed_from=resumed_from,
                       train_seconds=seconds, tokens=tokens, final_loss=record["final_loss"])


def _prepare_model_and_data(config: TrainConfig, data: TrainingData, cuda: bool):
    """(peft model, tokenizer, tokenized data, run_info): the base model with a fresh LoRA, and the labels."""
    import transformers


    transformers.set_seed(config.seed)  # the LoRA init
    handle = load_model(config.model, device="cpu", dtype=train_dtype(config.training, cuda))  # Trainer places it
    tokenizer = handle.tokenizer
    tokenizer.padding_side = "right"  # training batches pad on the right; labels mask the padding
    model = attach_lora(handle.model, config.lora, handle.n_layers)
    tokenized = tokenize_conversations(tokenizer, data.conversations, config.training.max_length,
                                       config.training.assistant_only)
    if not tokenized.input_ids:
        raise EmlensInputError(f"field 'training.max_length': no example keeps an assistant token within "
                               f"{config.training.max_length} tokens")
    run_info = {"config": config.run_config(), "data": {**data.summary, "sha256": data.sha256},
                "base_model": config.model, "base_fingerprint": handle.base_fingerprint,
                "versions": package_versions()}
    return model, tokenizer, tokenized, run_info
