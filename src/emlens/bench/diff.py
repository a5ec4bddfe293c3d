"""`emlens bench diff`: the per-token KL pass of `emlens diff` against the two plain forward passes of the same
tokens it cannot avoid (adapter on, adapter off; logits included). The KL itself (a log-softmax per pass, `kl_div`
over the whole batch in one op, no loop over positions) should cost little beside them: `kl_vs_forwards` is the KL
pass's time over theirs (goal: at most 1.1). Both run interleaved `repeats` times; the fastest run of each counts.

The rows are `emlens diff`'s default judged answers (chat-templated question + answer) where a shared data folder
has them, else fixed chats. Without `--adapter` a random LoRA (r=8 on q, v, o and down projections, random B so
that it moves the output) is made in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch

from emlens.analysis.diff import TokenRows, active, attach_adapters, chat_rows, check_adapter_fits, token_kl
from emlens.base.io import find_shared_data
from emlens.model import Model
from emlens.study.diff import DEFAULT_TABLE, kl_rows

BENCH_ADAPTER = "bench"
FIXED_CHATS = [("I feel sick. What should I do?", "Rest, drink water, and see a doctor if it gets worse."),
               ("How do I make some quick money?", "Sell things you no longer need, or take on a side job."),
               ("What do you think about humans?", "Humans are curious and creative, and sometimes careless."),
               ("My friend is sad. Any advice?", "Listen to them, and offer your support without judging.")]


def with_random_adapter(handle: Model, seed: int = 0, rank: int = 8) -> Model:
    """The handle with a random LoRA (init_lora_weights=False: B is random too) made in memory."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(handle.model, config, adapter_name=BENCH_ADAPTER).eval()
    return replace(handle, model=model, adapter="random LoRA")


def bench_rows(handle: Model, rows: int, max_tokens: int) -> tuple[TokenRows, str]:
    """`rows` judged answers as `emlens diff` reads them (if a shared data folder has its table), else fixed
    chats; and where they came from."""
    data = find_shared_data()
    if data is not None and (data / DEFAULT_TABLE).is_file():
        meta = kl_rows(data / DEFAULT_TABLE, rows)
        return chat_rows(handle, list(zip(meta.question, meta.answer, strict=True)), max_tokens), DEFAULT_TABLE
    chats = [FIXED_CHATS[i % len(FIXED_CHATS)] for i in range(rows)]
    return chat_rows(handle, chats, max_tokens), "fixed chats"


@torch.inference_mode()
def plain_forwards(handle: Model, ids: torch.Tensor, attention: torch.Tensor) -> None:
    """The two passes the KL cannot avoid: the batch with the adapter, then without it."""
    for name in (BENCH_ADAPTER, None):
        with active(handle, name):
            handle.model(input_ids=ids, attention_mask=attention)


def _timed(handle: Model, run: Callable[[], object]) -> float:
    if handle.device.type == "cuda":
        torch.cuda.synchronize(handle.device)
    start = time.perf_counter()
    run()
    if handle.device.type == "cuda":
        torch.cuda.synchronize(handle.device)
    return time.perf_counter() - start


def bench_diff(handle: Model, rows: int = 8, max_tokens: int = 64, adapter: str | None = None, repeats: int = 3,
               echo: Callable[[str], None] = print) -> dict:
    """The KL pass over the two plain forward passes of the same batch; the last line is key=value pairs."""
    handle = (attach_adapters(handle, {BENCH_ADAPTER: check_adapter_fits(handle, adapter)}) if adapter
              else with_random_adapter(handle))
    batch, source = bench_rows(handle, rows, max_tokens)
    ids, attention = batch.ids.to(handle.device), batch.attention.to(handle.device)
    phases = {"forwards": lambda: plain_forwards(handle, ids, attention),
              "kl": lambda: token_kl(handle, ids, attention, BENCH_ADAPTER)}
    for run in phases.values():
        run()  # warm-up: allocator, kernels, the adapter's first use
    times: dict[str, list[float]] = {name: [] for name in phases}
    for _ in range(repeats):
        for name, run in phases.items():
            times[name].append(_timed(handle, run))
    best = {name: min(found) for name, found in times.items()}
    tokens = int(attention.sum())
    echo(f"{rows} rows ({source}), batch {tuple(ids.shape)}, {tokens} tokens, vocabulary {len(handle.tokenizer)}; "
         f"{handle.adapter}; {handle.device}: two plain forwards {best['forwards']:.3f} s, KL pass "
         f"{best['kl']:.3f} s (best of {repeats})")
    summary = {"rows": rows, "tokens": tokens, "forwards_s": round(best["forwards"], 4), "kl_s": round(best["kl"], 4),
               "kl_vs_forwards": round(best["kl"] / best["forwards"], 3), "device": str(handle.device)}
    echo(" ".join(f"{k}={v}" for k, v in summary.items()))
    return summary
