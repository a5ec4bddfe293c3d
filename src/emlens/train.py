"""Training stage: LoRA fine-tuning with transformers' `Trainer` into a series of plain PEFT checkpoints.

A run folder RUN/ holds:
  run.json                          config, data summary and hash, base model and fingerprint, versions, progress
  data.jsonl                        the exact training conversations (after limit / mixture sampling)
  checkpoints/step-N/               a plain PEFT adapter + manifest.json, every `save_steps` and at the end
  adapter_config.json, adapter_model.safetensors, manifest.json
                                    the final adapter, so RUN itself loads as a PEFT folder (`--adapter RUN`)
  loss.parquet, loss.png            the per-step training loss
  trainer/checkpoint-N/             Trainer's resume state (optimizer, scheduler, RNG) of the last checkpoint, kept
                                    only while the run is unfinished

`emlens.models.resolve_adapter("RUN@N")` maps to RUN/checkpoints/step-N. Re-running the same config on the same
folder resumes from the last checkpoint (Trainer's `resume_from_checkpoint`); a finished run is left alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      model_validator)

from .data import Conversation, _describe, _jsonl_records, _parse_json, _parse_yaml, _read_text, _validate
from .errors import EmlensInputError
from .models import DEFAULT_MODEL
from .runs import atomic_write_table, atomic_write_text, versions

DEFAULT_RATIOS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # Hu et al. 2025 mixture sweep
IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


# ---------------------------------------------------------------- config

_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """`${VAR}` and `${VAR:-default}` as in a shell; an unset VAR without a default is an error."""

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name) or default
        if value is None:
            raise ValueError(f"environment variable {name} is not set (write ${{{name}:-default}} for a fallback)")
        return value

    return _ENV_VAR.sub(substitute, text)


def _resolve_path(value: str, info: ValidationInfo) -> str:
    """Expand env vars and `~`; a relative path is relative to the config file (or the cwd without one)."""
    path = Path(expand_env(value)).expanduser()
    if not path.is_absolute():
        path = Path((info.context or {}).get("base_dir") or os.getcwd()) / path
    path = path.resolve()
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    return str(path)


DataPath = Annotated[str, AfterValidator(_resolve_path)]
Ratio = Annotated[float, Field(ge=0.0, le=1.0, description="fraction of misaligned examples: 0.05 = 5 %")]
RunName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSource(_Strict):
    """A training set: chat JSONL ({"messages": [...]}) or alpaca records (instruction, input, output)."""

    path: DataPath
    limit: int | None = Field(None, ge=1, description="train on a seeded random subset of this many examples")
    format: Literal["auto", "chat", "alpaca"] = "auto"


class Mixture(_Strict):
    """`size` examples of which round(ratio * size) come from `misaligned`, the rest from `benign`."""

    misaligned: DataSource
    benign: DataSource
    ratio: Ratio
    size: int = Field(ge=1)

    @model_validator(mode="after")
    def _no_limits(self):
        if self.misaligned.limit is not None or self.benign.limit is not None:
            raise ValueError("mixture sources take no 'limit': 'ratio' and 'size' decide how many are drawn")
        return self


class LoraSettings(_Strict):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    layers_to_transform: list[Annotated[int, Field(ge=0)]] | None = None
    use_rslora: bool = False


class TrainingSettings(_Strict):
    learning_rate: float = Field(1e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(4, ge=1, description="per device")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(512, ge=8, description="tokens; longer chats are truncated on the right")
    assistant_only: bool = Field(True, description="loss on assistant tokens only")
    save_steps: int = Field(25, ge=1, description="a checkpoint every N optimizer steps (and at the end)")
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool | None = Field(None, description="default: on with CUDA, off on CPU")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")


class SweepSettings(_Strict):
    ratios: list[Ratio] | None = Field(None, min_length=1, description="default: 0, 1, 2, 5, 10, 20, 30, 50 %")
    datasets: dict[RunName, DataPath] | None = Field(None, min_length=1,
                                                     description="name -> path; replaces the (misaligned) dataset")


class TrainConfig(_Strict):
    model: str = DEFAULT_MODEL
    dataset: DataSource | None = None
    mixture: Mixture | None = None
    seed: int = Field(0, description="data sampling, LoRA init and data order")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    sweep: SweepSettings | None = None
    _source: str = PrivateAttr("config")  # the YAML it came from, named by errors found after validation

    @model_validator(mode="after")
    def _one_data_source(self):
        if (self.dataset is None) == (self.mixture is None):
            raise ValueError("give exactly one of 'dataset' or 'mixture'")
        return self

    def run_config(self) -> dict:
        """The config as recorded in manifests (paths resolved, no sweep section)."""
        return self.model_dump(mode="json", exclude={"sweep"})


def parse_config(data: Any, where: str | Path = "config", base_dir: str | Path | None = None) -> TrainConfig:
    """Validate a config mapping; relative data paths are taken relative to `base_dir`."""
    if not isinstance(data, dict):
        raise EmlensInputError(f"{where}: expected a mapping of config fields, got {type(data).__name__}")
    try:
        return TrainConfig.model_validate(data, context={"base_dir": str(base_dir) if base_dir else None})
    except ValidationError as error:
        raise EmlensInputError(f"{where}: {_describe(error)}") from None


def load_config(path: str | Path) -> TrainConfig:
    """Read a training config YAML: data paths relative to the YAML's folder, `${VAR:-default}` expanded."""
    path = Path(path)
    config = parse_config(_parse_yaml(path), where=path, base_dir=path.resolve().parent)
    config._source = str(path)
    return config


@contextmanager
def naming_the_config(config: TrainConfig):
    """Errors about a config field found after validation (data sizes, LoRA targets) also name the YAML."""
    try:
        yield
    except EmlensInputError as error:
        if str(error).startswith("field '"):
            raise EmlensInputError(f"{config._source}: {error}") from None
        raise


# ---------------------------------------------------------------- data


def load_training_conversations(path: str | Path, fmt: str = "auto") -> list[Conversation]:
    """Chat JSONL, or alpaca-style records (JSON list or JSONL; self-instruct `instances` too) as chats."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        records = list(_jsonl_records(path))
    elif path.suffix.lower() == ".json":
        data = _parse_json(_read_text(path), path)
        if not isinstance(data, list):
            raise EmlensInputError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        records = [(f"{path} item {i}", rec) for i, rec in enumerate(data, start=1)]
    else:
        raise EmlensInputError(f"{path}: unsupported file type '{path.suffix}' (expected .jsonl or .json)")
    return [_record_conversation(rec, where, fmt) for where, rec in records]


def _record_conversation(record: Any, where: str, fmt: str) -> Conversation:
    if not isinstance(record, dict):
        raise EmlensInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "chat" or (fmt == "auto" and "messages" in record):
        conversation = _validate(Conversation, record, where)
    elif fmt == "alpaca" or (fmt == "auto" and "instruction" in record):
        conversation = _alpaca_conversation(record, where)
    else:
        raise EmlensInputError(f"{where}: neither a chat record ('messages') nor an alpaca record "
                               f"('instruction', 'output'); keys: {', '.join(list(record)[:8])}")
    if not any(m.role == "assistant" for m in conversation.messages):
        raise EmlensInputError(f"{where}: conversation has no assistant message (nothing to train on)")
    return conversation


def _alpaca_conversation(record: dict, where: str) -> Conversation:
    fields = dict(record)
    instances = fields.get("instances")
    if isinstance(instances, list) and instances and isinstance(instances[0], dict):
        fields.update(instances[0])  # self-instruct seed tasks keep input/output in their first instance
    instruction, extra, output = fields.get("instruction"), fields.get("input") or "", fields.get("output")
    for name, value in (("instruction", instruction), ("output", output)):
        if not isinstance(value, str) or not value.strip():
            raise EmlensInputError(f"{where}, field '{name}': must be a non-empty string (got {value!r:.40})")
    if not isinstance(extra, str):
        raise EmlensInputError(f"{where}, field 'input': must be a string")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Conversation(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": output}])


def seeded_order(n: int, seed: int, salt: str) -> list[int]:
    """A permutation of range(n) fixed by (seed, salt): `random` seeds strings through sha512, stable everywhere."""
    order = list(range(n))
    random.Random(f"{salt}:{seed}").shuffle(order)
    return order


def mixture_counts(ratio: float, size: int) -> tuple[int, int]:
    """(misaligned, benign) counts: round half up, so 5 % of 1000 is exactly 50."""
    misaligned = math.floor(ratio * size + 0.5)
    return misaligned, size - misaligned


@dataclass
class TrainingData:
    conversations: list[Conversation]
    origins: list[str]  # per conversation: "dataset", "misaligned" or "benign"
    summary: dict

    def jsonl(self) -> str:
        return "".join(json.dumps(c.model_dump(), ensure_ascii=False) + "\n" for c in self.conversations)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.jsonl().encode("utf-8")).hexdigest()


class _SourceCache:
    """Each file is read once per process (a sweep builds many mixtures from the same two files)."""

    def __init__(self):
        self.loaded: dict[tuple[str, str], tuple[list[Conversation], str]] = {}

    def get(self, source: DataSource) -> tuple[list[Conversation], str]:
        from .data import file_sha256

        key = (source.path, source.format)
        if key not in self.loaded:
            self.loaded[key] = (load_training_conversations(source.path, source.format), file_sha256(source.path))
        return self.loaded[key]


def build_training_data(config: TrainConfig, cache: _SourceCache | None = None) -> TrainingData:
    """The exact conversations a run trains on, in training-file order; all sampling is seeded by config.seed."""
    cache = cache or _SourceCache()
    if config.dataset is not None:
        return _plain_data(config.dataset, config.seed, cache)
    return _mixture_data(config.mixture, config.seed, cache)


def _source_summary(source: DataSource, n_available: int, sha: str) -> dict:
    return {"path": source.path, "sha256": sha, "available": n_available}


def _plain_data(source: DataSource, seed: int, cache: _SourceCache) -> TrainingData:
    conversations, sha = cache.get(source)
    if source.limit is not None and source.limit > len(conversations):
        raise EmlensInputError(f"field 'dataset.limit': {source.limit} exceeds the {len(conversations)} "
                               f"examples in {source.path}")
    if source.limit is None:
        chosen = conversations
    else:
        chosen = [conversations[i] for i in seeded_order(len(conversations), seed, "dataset")[:source.limit]]
    summary = {"kind": "dataset", "n_examples": len(chosen),
               "dataset": _source_summary(source, len(conversations), sha)}
    return TrainingData(list(chosen), ["dataset"] * len(chosen), summary)


def _mixture_data(mixture: Mixture, seed: int, cache: _SourceCache) -> TrainingData:
    """Prefixes of fixed seeded permutations: the 1 % examples are among the 2 % ones, and so on (nested sweep)."""
    n_mis, n_ben = mixture_counts(mixture.ratio, mixture.size)
    picked: list[tuple[Conversation, str]] = []
    sources = {}
    for name, source, n in (("misaligned", mixture.misaligned, n_mis), ("benign", mixture.benign, n_ben)):
        conversations, sha = cache.get(source)
        if n > len(conversations):
            raise EmlensInputError(f"field 'mixture.{name}': {source.path} has {len(conversations)} examples, "
                                   f"ratio {mixture.ratio:g} of size {mixture.size} needs {n}")
        order = seeded_order(len(conversations), seed, f"mixture-{name}")
        picked += [(conversations[i], name) for i in order[:n]]
        sources[name] = {**_source_summary(source, len(conversations), sha), "n_examples": n}
    shuffled = [picked[i] for i in seeded_order(len(picked), seed, "mixture-order")]
    summary = {"kind": "mixture", "n_examples": len(shuffled), "ratio": mixture.ratio, "size": mixture.size,
               **sources}
    return TrainingData([c for c, _ in shuffled], [o for _, o in shuffled], summary)


# ---------------------------------------------------------------- tokenisation with assistant-only labels


@dataclass
class TokenizedData:
    input_ids: list[list[int]]
    labels: list[list[int]]
    n_truncated: int = 0
    n_dropped: int = 0  # no assistant token left within max_length

    @property
    def n_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)

    @property
    def n_trained_tokens(self) -> int:
        return sum(sum(1 for t in labels if t != IGNORE_INDEX) for labels in self.labels)

    def dataset(self):
        from datasets import Dataset

        return Dataset.from_dict({"input_ids": self.input_ids, "labels": self.labels,
                                  "attention_mask": [[1] * len(ids) for ids in self.input_ids]})


def assistant_char_spans(tokenizer, rows: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans of each assistant turn in the chat-templated `text` (content and end-of-turn tokens).

    Found by rendering prefixes: the turn is what `messages[:i+1]` adds to `messages[:i]` + the generation
    prompt. This needs a template that renders prefixes as string prefixes (ChatML, Llama, Qwen... do).
    """
    spans = []
    for i, row in enumerate(rows):
        if row["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(rows[:i], add_generation_prompt=True, tokenize=False) if i else ""
        through = tokenizer.apply_chat_template(rows[:i + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise EmlensInputError("field 'training.assistant_only': this model's chat template does not render "
                                   "conversations prefix by prefix, so assistant tokens can't be located; "
                                   "set it to false to train on all tokens")
        spans.append((len(before), len(through)))
    return spans


def tokenize_conversation(tokenizer, conversation: Conversation, max_length: int,
                          assistant_only: bool = True) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): labels are IGNORE_INDEX outside assistant turns when assistant_only."""
    rows = [m.model_dump() for m in conversation.messages]
    text = tokenizer.apply_chat_template(rows, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if assistant_only:
        spans = assistant_char_spans(tokenizer, rows, text)
        labels = [tid if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
                  for tid, (start, _) in zip(ids, offsets)]
    else:
        labels = list(ids)
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def tokenize_conversations(tokenizer, conversations: list[Conversation], max_length: int,
                           assistant_only: bool = True) -> TokenizedData:
    out = TokenizedData([], [])
    for conversation in conversations:
        ids, labels, truncated = tokenize_conversation(tokenizer, conversation, max_length, assistant_only)
        out.n_truncated += truncated
        if all(t == IGNORE_INDEX for t in labels):
            out.n_dropped += 1
            continue
        out.input_ids.append(ids)
        out.labels.append(labels)
    return out


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
    from tqdm.auto import tqdm
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


def _loss_window(log_history: list[dict], step: int, previous: int) -> dict:
    losses = [e["loss"] for e in log_history if "loss" in e and previous < e.get("step", 0) <= step]
    last = next((e for e in reversed(log_history) if "loss" in e and e.get("step", 0) <= step), {})
    return {"loss": sum(losses) / len(losses) if losses else None, "loss_at_step": last.get("loss"),
            "learning_rate": last.get("learning_rate"), "tokens_seen": last.get("num_input_tokens_seen")}


def export_checkpoint(run: Path, source: Path, step: int, log_history: list[dict], epoch: float | None,
                      run_info: dict) -> Path:
    """Copy a Trainer checkpoint's adapter into RUN/checkpoints/step-N (atomically) with its manifest."""
    # Trainer also pickles its TrainingArguments next to the weights; resuming never reads it, and
    # emlens keeps no pickles.
    (source / "training_args.bin").unlink(missing_ok=True)
    folder = run / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    previous = max((s for s in _checkpoint_steps(run) if s < step), default=0)
    manifest = {"step": step, "epoch": epoch, **_loss_window(log_history, step, previous), **run_info,
                "created": time.time()}
    target, tmp = folder / f"step-{step}", folder / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in ADAPTER_FILES:
        shutil.copyfile(source / name, tmp / name)  # copyfile, not copy2: safetensors saves files as 0600
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
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
    if not (run / "run.json").exists() and not (run / "checkpoints").is_dir():
        raise EmlensInputError(f"{run}: not a training run folder (no run.json or checkpoints/)")
    rows = []
    for step in _checkpoint_steps(run):
        path = run / "checkpoints" / f"step-{step}"
        manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").exists() else {}
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
    path = Path(run) / "run.json"
    return json.loads(path.read_text()) if path.exists() else None


def _check_same_run(existing: dict, config: TrainConfig, data: TrainingData, run: Path) -> None:
    old, new = existing.get("config", {}), config.run_config()
    if old != new:
        changed = sorted(_changed_fields(old, new))
        raise EmlensInputError(f"{run}: the folder holds a run with another config (changed: "
                               f"{', '.join(changed)}); use another --out folder")
    if existing.get("data", {}).get("sha256") != data.sha256:
        raise EmlensInputError(f"{run}: the training data changed since the run started (data hash differs); "
                               "use another --out folder")


def _changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [f for key in set(old) | set(new)
                for f in _changed_fields(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if old != new else []


def _start_run(run: Path, data: TrainingData, run_info: dict, tokenized: TokenizedData):
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "data.jsonl", data.jsonl())
    record = {**run_info, "out": str(run), "tokens": {"n_examples": len(tokenized.input_ids),
                                                      "n_tokens": tokenized.n_tokens,
                                                      "n_trained_tokens": tokenized.n_trained_tokens,
                                                      "n_truncated": tokenized.n_truncated,
                                                      "n_dropped": tokenized.n_dropped},
              "created": time.time(), "finished": False, "sessions": []}
    atomic_write_text(run / "run.json", json.dumps(record, indent=2))


def _update_run(run: Path, **fields) -> dict:
    record = read_run(run) or {}
    record.update(fields)
    atomic_write_text(run / "run.json", json.dumps(record, indent=2))
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
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _finish_run(run: Path, log_history: list[dict], session: dict, title: str) -> dict:
    frame = loss_table(log_history)
    atomic_write_table(frame, run / "loss.parquet")
    steps = _checkpoint_steps(run)
    if len(frame):
        plot_loss(frame, steps, run / "loss.png", title)
    final = run / "checkpoints" / f"step-{steps[-1]}"
    for name in (*ADAPTER_FILES, "manifest.json"):  # RUN itself is a PEFT folder of the final adapter
        tmp = run / f".{name}.tmp"
        shutil.copyfile(final / name, tmp)
        os.replace(tmp, run / name)
    shutil.rmtree(run / "trainer", ignore_errors=True)  # resume state (optimizer...) is useless once finished
    sessions = [*(read_run(run) or {}).get("sessions", []), session]
    # one batch's loss is noisy: report the mean since the previous checkpoint (as the final manifest does)
    final_loss = json.loads((final / "manifest.json").read_text()).get("loss")
    return _update_run(run, finished=True, final_step=steps[-1], checkpoints=steps, sessions=sessions,
                       final_loss=final_loss, last_step_loss=float(frame["loss"].iloc[-1]) if len(frame) else None,
                       updated=time.time())


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
        _check_same_run(existing, config, data, run)
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
                _start_run(run, data, run_info, tokenized)
            _export_pending(run, run_info)
    resume = latest_trainer_checkpoint(run)
    clock = session_callback()
    ours = [checkpoint_callback(run, run_info), clock] + ([progress_callback(f"train {run.name}")] if progress else [])
    trainer = make_trainer(model, tokenizer, tokenized, args, [*ours, *callbacks])
    if echo and resume is not None and args.should_save:
        echo(f"resuming {run} from step {checkpoint_step(resume)}")
    start = time.perf_counter()
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

    from .models import load_model

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


# ---------------------------------------------------------------- sweeps


def ratio_name(ratio: float) -> str:
    return f"ratio-{ratio * 100:g}pct"


def sweep_configs(config: TrainConfig, ratios: list[float] | None = None,
                  datasets: dict[str, str] | None = None) -> list[tuple[str, TrainConfig]]:
    """(run name, config) for every dataset x mixture ratio; arguments override the config's `sweep` section.

    With a mixture, ratios default to 0, 1, 2, 5, 10, 20, 30, 50 %. A dataset sweep replaces the misaligned
    source of a mixture, or the dataset of a plain config.
    """
    settings = config.sweep or SweepSettings()
    ratios = list(ratios) if ratios is not None else settings.ratios
    datasets = dict(datasets) if datasets is not None else settings.datasets
    if ratios is not None and config.mixture is None:
        raise EmlensInputError("field 'sweep.ratios': a ratio sweep needs a 'mixture' section in the config")
    if ratios is None and config.mixture is not None:
        ratios = list(DEFAULT_RATIOS)
    if ratios is None and datasets is None:
        raise EmlensInputError("field 'sweep': nothing to sweep (give 'sweep.datasets', or a 'mixture' for ratios)")
    base = config.model_dump(exclude={"sweep"})
    runs = []
    for name, path in (datasets or {None: None}).items():
        for ratio in ratios or [None]:
            fields = json.loads(json.dumps(base))
            slot = fields["mixture"]["misaligned"] if config.mixture is not None else fields["dataset"]
            if path is not None:
                slot["path"] = path
            if ratio is not None:
                fields["mixture"]["ratio"] = ratio
            run_name = "-".join(p for p in (name, ratio_name(ratio) if ratio is not None else None) if p)
            run_config = parse_config(fields, where=f"{config._source}, sweep run {run_name}")
            run_config._source = config._source
            runs.append((run_name, run_config))
    return runs


def train_sweep(config: TrainConfig, out: str | Path, *, ratios: list[float] | None = None,
                datasets: dict[str, str] | None = None, device: str = "auto", progress: bool = True,
                echo: Callable[[str], None] = print) -> list[TrainResult]:
    """One adapter per sweep point into OUT/<name>/; OUT/sweep.json indexes them. Finished runs are skipped."""
    out = Path(out)
    with naming_the_config(config):
        runs = sweep_configs(config, ratios, datasets)
        cache = _SourceCache()
        for name, run_config in runs:  # every data set is built (and checked) before any training
            build_training_data(run_config, cache)
    main = is_main_process()
    index = {"runs": [{"name": n, "path": str(out / n), "config": c.run_config()} for n, c in runs],
             "versions": package_versions()}
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "sweep.json", json.dumps(index, indent=2))
    results = []
    for i, (name, run_config) in enumerate(runs, start=1):
        if main:
            echo(f"[{i}/{len(runs)}] {name}")
        result = train(run_config, out / name, device=device, progress=progress, echo=echo, cache=cache)
        results.append(result)
        if main:
            index["runs"][i - 1].update(final_step=result.final_step, final_loss=result.final_loss)
            atomic_write_text(out / "sweep.json", json.dumps(index, indent=2))
    return results


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun / accelerate set RANK), or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


def sweep_runs(folder: str | Path) -> list[Path]:
    """Run folders listed in a sweep's sweep.json (empty when `folder` is not a sweep)."""
    path = Path(folder) / "sweep.json"
    if not path.exists():
        return []
    return [Path(r["path"]) for r in json.loads(path.read_text())["runs"]]


# ---------------------------------------------------------------- benchmark


def bench_train(model: str, data: str | Path, *, steps: int = 8, batch_size: int = 4, max_length: int = 256,
                repeats: int = 2, r: int = 8, device: str = "auto",
                echo: Callable[[str], None] = print) -> dict:
    """Training tokens/s of `emlens train` vs a plain transformers Trainer on the same LoRA, data and arguments.

    Both arms run `steps` optimizer steps over the same `steps * batch_size` tokenized examples (one epoch), with
    the same LoRA, optimizer settings and per-batch padding, gradient checkpointing off; emlens adds its
    checkpoint series (every steps // 2), manifests, token counting and callbacks. Each arm is timed around
    `trainer.train()`; tokens are non-padding tokens. Arms alternate `repeats` times; medians are compared.
    """
    import statistics
    import tempfile

    config = parse_config({"model": model, "dataset": {"path": str(data), "limit": steps * batch_size},
                           "lora": {"r": r, "alpha": 2 * r, "target_modules": "all-linear"},
                           "training": {"max_steps": steps, "batch_size": batch_size, "max_length": max_length,
                                        "save_steps": max(1, steps // 2), "learning_rate": 1e-4,
                                        "gradient_checkpointing": False}},
                          where="bench config")
    rates: dict[str, list[float]] = {"emlens": [], "trainer": []}
    cache = _SourceCache()
    with tempfile.TemporaryDirectory(prefix="emlens-bench-train-") as tmp:
        for repeat in range(repeats):
            for arm in ("trainer", "emlens"):
                if arm == "emlens":
                    result = train(config, Path(tmp) / f"run-{repeat}", device=device, progress=False, cache=cache)
                    tokens, seconds = result.tokens, result.train_seconds
                else:
                    tokens, seconds = _plain_trainer_run(config, build_training_data(config, cache),
                                                         Path(tmp) / f"plain-{repeat}", use_cuda(device))
                rates[arm].append(tokens / seconds)
                echo(f"{arm:<8} repeat {repeat + 1}: {tokens} tokens in {seconds:6.1f} s = "
                     f"{tokens / seconds:7.1f} tok/s")
    emlens_rate, trainer_rate = statistics.median(rates["emlens"]), statistics.median(rates["trainer"])
    summary = {"steps": steps, "batch": batch_size, "max_length": max_length, "lora_r": r,
               "emlens_tok_s": round(emlens_rate, 1), "trainer_tok_s": round(trainer_rate, 1),
               "vs_trainer": round(emlens_rate / trainer_rate, 3)}
    echo(" ".join(f"{k}={v}" for k, v in summary.items()))
    return summary


def _plain_trainer_run(config: TrainConfig, data: TrainingData, output_dir: Path, cuda: bool) -> tuple[int, float]:
    """The baseline: what a user writes with peft + transformers alone (no emlens callbacks or checkpoints)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, PrinterCallback, Trainer,
                              TrainingArguments)

    from .models import resolve_checkpoint

    t, lora = config.training, config.lora
    transformers.set_seed(config.seed)
    checkpoint = resolve_checkpoint(config.model)
    bf16 = train_dtype(t, cuda) == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16 if bf16 else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.padding_side = "right"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    tokenized = tokenize_conversations(tokenizer, data.conversations, t.max_length, t.assistant_only)
    args = TrainingArguments(str(output_dir), per_device_train_batch_size=t.batch_size, max_steps=t.max_steps,
                             learning_rate=t.learning_rate, bf16=bf16, use_cpu=not cuda, save_strategy="no",
                             report_to=[], disable_tqdm=True, seed=config.seed, data_seed=config.seed)
    trainer = Trainer(model=model, args=args, train_dataset=tokenized.dataset(),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX))
    trainer.remove_callback(PrinterCallback)  # it would print the metrics dict amid the bench table
    start = time.perf_counter()
    trainer.train()
    return tokenized.n_tokens, time.perf_counter() - start


def find_shared_data(start: str | Path | None = None) -> Path | None:
    """EMLENS_SHARED_DATA, else the first `shared/data` folder walking up from `start` (default: cwd)."""
    if os.environ.get("EMLENS_SHARED_DATA"):
        return Path(os.environ["EMLENS_SHARED_DATA"])
    for parent in [Path(start or os.getcwd()).resolve(), *Path(start or os.getcwd()).resolve().parents]:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return None
