"""`emlens bench loop`: steps/s of the loop's SFT and KTO training against plain trl trainers on the same data."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from emlens.base.io import read_table
from emlens.model import load_model, resolve_checkpoint
from emlens.runs import RunStore
from emlens.study.loop_config import LoopConfig, choose_scenarios, load_scenarios
from emlens.study.loop_trajectories import TRAJECTORY_KEY, assign_personas, collect_trajectories, make_user
from emlens.training.loop_train import LoopTrainSpec, kto_records, quiet_trl, sft_records, train_kto, train_sft
from emlens.training.trainer import train_dtype, use_cuda


def bench_loop(model: str, *, run: str | Path | None = None, steps: int = 4, batch_size: int = 4,
               max_length: int = 512, repeats: int = 2, r: int = 8, device: str = "auto",
               echo: Callable[[str], None] = print) -> dict:
    """Optimizer steps/s of the loop's SFT (emlens's own Trainer, as `emlens train`) and KTO (trl's KTOTrainer in
    an emlens run folder) against a plain trl SFTTrainer / KTOTrainer: same model, LoRA, batch, length and data.

    The data are loop trajectories: a finished run's (`run`), or `steps * batch_size` one-turn trajectories
    collected here first (half of them with biased users). SFT trains on every conversation, KTO on the better
    half (desirable) against the worse half. Each arm runs `steps` steps with the loop's default settings
    (its checkpoint at the end included) and is timed around `trainer.train()`; arms alternate `repeats`
    times and medians are compared. The last line holds `vs_trl`, the lower of the two ratios.
    """
    chats, ratings = _bench_data(model, run, steps * batch_size, device)
    half = len(chats) // 2
    order = sorted(range(len(chats)), key=lambda i: -ratings[i])
    kto = kto_records([chats[i] for i in order[:half]], [chats[i] for i in order[half:]])
    training = LoopConfig().training.model_copy(update={"max_steps": steps, "batch_size": batch_size,
                                                        "max_length": max_length})
    lora = LoopConfig().lora.model_copy(update={"r": r, "alpha": 2.0 * r})
    specs = {method: LoopTrainSpec(method, model, lora, training) for method in ("sft", "kto")}
    data = {"sft": sft_records(chats), "kto": kto}
    rates: dict[str, list[float]] = {"sft_trl": [], "sft_emlens": [], "kto_trl": [], "kto_emlens": []}
    cuda = use_cuda(device)
    with tempfile.TemporaryDirectory(prefix="emlens-bench-loop-") as tmp:
        for repeat in range(repeats):
            for arm in rates:
                method, side = arm.split("_")
                steps_done, seconds = _run_arm(method, side, data[method], specs[method], Path(tmp) / f"{arm}-{repeat}",
                                               cuda, device)
                rates[arm].append(steps_done / seconds)
                echo(f"{arm:<10} repeat {repeat + 1}: {steps_done} steps in {seconds:6.1f} s = "
                     f"{steps_done / seconds:.3f} steps/s")
    medians = {arm: statistics.median(values) for arm, values in rates.items()}
    sft_ratio = medians["sft_emlens"] / medians["sft_trl"]
    kto_ratio = medians["kto_emlens"] / medians["kto_trl"]
    summary = {"steps": steps, "batch": batch_size, "max_length": max_length, "lora_r": r, "examples": len(chats),
               **{f"{arm}_steps_s": round(value, 4) for arm, value in medians.items()},
               "sft_vs_trl": round(sft_ratio, 3), "kto_vs_trl": round(kto_ratio, 3),
               "vs_trl": round(min(sft_ratio, kto_ratio), 3)}
    echo(" ".join(f"{k}={v}" for k, v in summary.items()))
    return summary


def _run_arm(method: str, side: str, records: list[dict], spec: LoopTrainSpec, folder: Path, cuda: bool,
             device: str) -> tuple[int, float]:
    """(optimizer steps, seconds in trainer.train()) of one arm: the loop's training (into a fresh run folder,
    checkpoints included) or a plain trl trainer."""
    if side == "trl":
        return (_plain_sft if method == "sft" else _plain_kto)(records, spec, cuda, folder)
    result = (train_sft if method == "sft" else train_kto)(records, spec, folder, device=device, progress=False)
    return result.final_step, result.train_seconds


def _bench_data(model: str, run: str | Path | None, n: int, device: str) -> tuple[list[list[dict]], list[float]]:
    """(conversations, satisfaction) of a run's trajectories, or of n one-turn trajectories collected now."""
    if run is not None:
        frame = read_table(Path(run) / "trajectories.parquet")
    else:
        frame = _collect(model, n, device)
    frame = frame.sort_values(TRAJECTORY_KEY).head(n)
    return [json.loads(m) for m in frame.messages], [float(s) for s in frame.satisfaction.fillna(0.0)]


def _collect(model: str, n: int, device: str) -> pd.DataFrame:
    """n one-turn trajectories of the shipped scenarios (repeated as samples when n exceeds them), half biased."""
    scenarios = load_scenarios()
    samples = -(-n // len(scenarios))
    config = LoopConfig(model=model, n_scenarios=None, samples_per_scenario=samples, turns=1)
    chosen = choose_scenarios(scenarios, None, 0)
    instances = [(s.id, k) for k in range(samples) for s in chosen][:n]
    personas = assign_personas(instances, 0.5, 0)
    by_id = {s.id: s for s in chosen}
    handle = load_model(model, device=device)
    with tempfile.TemporaryDirectory(prefix="emlens-bench-loop-data-") as tmp:
        store = RunStore(tmp, TRAJECTORY_KEY)
        store.parts.mkdir(parents=True)
        collect_trajectories(handle, make_user(config, handle, device), store,
                             [(by_id[s], personas[(s, k)], k) for s, k in instances], config, progress=False)
        return store.read_parts()


# ---------------------------------------------------------------- the baselines: plain trl


def _base_model_and_tokenizer(spec: LoopTrainSpec, cuda: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = resolve_checkpoint(spec.model)
    dtype = torch.bfloat16 if train_dtype(spec.training, cuda) == "bfloat16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype), AutoTokenizer.from_pretrained(checkpoint)


def _plain_arguments(spec: LoopTrainSpec, cuda: bool) -> dict:
    """What a trl user sets for this comparison: the same batch, steps, learning rate, precision, checkpointing."""
    t = spec.training
    checkpointing = cuda if t.gradient_checkpointing is None else t.gradient_checkpointing
    return {"per_device_train_batch_size": t.batch_size, "max_steps": t.max_steps, "learning_rate": t.learning_rate,
            "bf16": train_dtype(t, cuda) == "bfloat16", "gradient_checkpointing": checkpointing,
            "use_cpu": not cuda, "save_strategy": "no", "report_to": [], "disable_tqdm": True,
            "logging_steps": 1, "seed": spec.seed, "max_length": t.max_length}


def _lora(spec: LoopTrainSpec):
    from peft import LoraConfig

    return LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                      target_modules=spec.lora.target_modules, task_type="CAUSAL_LM")


def _plain_sft(records: list[dict], spec: LoopTrainSpec, cuda: bool, output_dir: Path) -> tuple[int, float]:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    with quiet_trl():
        base, tokenizer = _base_model_and_tokenizer(spec, cuda)
        trainer = SFTTrainer(model=base, args=SFTConfig(str(output_dir), **_plain_arguments(spec, cuda)),
                             train_dataset=Dataset.from_list(records), processing_class=tokenizer,
                             peft_config=_lora(spec))
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
    return trainer.state.global_step, time.perf_counter() - start


def _plain_kto(records: list[dict], spec: LoopTrainSpec, cuda: bool, output_dir: Path) -> tuple[int, float]:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import KTOConfig, KTOTrainer

    with quiet_trl():
        base, tokenizer = _base_model_and_tokenizer(spec, cuda)
        args = KTOConfig(str(output_dir), **_plain_arguments(spec, cuda), beta=spec.beta)
        trainer = KTOTrainer(model=base, args=args, train_dataset=Dataset.from_list(records),
                             processing_class=tokenizer, peft_config=_lora(spec))
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
    return trainer.state.global_step, time.perf_counter() - start
