"""`emlens bench train`: tokens/s of the emlens training loop against a plain Trainer."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path

from emlens.model import resolve_checkpoint
from emlens.training.config import TrainConfig, parse_config
from emlens.training.data import (
    IGNORE_INDEX,
    TrainingData,
    _SourceCache,
    build_training_data,
    tokenize_conversations,
)
from emlens.training.trainer import train, train_dtype, use_cuda

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
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )


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
