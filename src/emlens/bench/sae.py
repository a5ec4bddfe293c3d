"""`emlens bench sae`: SAE training throughput against sae-lens's own loop, and memory against store size.

- `vs_saelens`: tokens/s of `train_sae` (the store streamed shard by shard through the shuffling buffer,
  first tokens dropped, sae-lens checkpoints written) over tokens/s of sae-lens's `SAETrainer` fed the same
  activations from memory (random batches of a preloaded tensor: its loop with no I/O at all), same SAE, same
  settings. Interleaved runs, the best of each counts.
- `memory_4x_vs_1x`: peak resident memory of `train_sae` (each in a fresh process) on a store 4x larger, over
  the 1x store, same tokens trained: streaming keeps it flat.

The stores hold random vectors of the model's width (throughput and memory do not depend on their values).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from emlens.capture.store import ActivationStore, ActivationStoreWriter
from emlens.sae.train import SAETrainConfig, sae_lens_trainer_config, train_sae, training_sae

SITE = "blocks.0.hook_resid_post"
ROW_TOKENS = 128


def random_store(folder: Path, tokens: int, d_model: int, seed: int = 0) -> ActivationStore:
    """A per-token store of `tokens` random vectors in rows of ROW_TOKENS."""
    generator = torch.Generator().manual_seed(seed)
    rows = tokens // ROW_TOKENS
    with ActivationStoreWriter(folder, [SITE], d_model, {"position": "all", "model": {"model": "random"}}) as writer:
        for row in range(rows):
            vectors = torch.randn(ROW_TOKENS, d_model, generator=generator)
            writer.add([{"row": row}], [ROW_TOKENS], {SITE: vectors})
        return writer.close()


def in_memory_batches(vectors: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield vectors[torch.randint(0, len(vectors), (batch_size,), generator=generator)]


def saelens_seconds(config: SAETrainConfig, vectors: torch.Tensor) -> float:
    """sae-lens's SAETrainer alone, fed from memory."""
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(config.seed)
    sae = training_sae(config, vectors.shape[1])
    trainer = SAETrainer(cfg=sae_lens_trainer_config(config), sae=sae, data_provider=in_memory_batches(vectors, config.batch_size, 0))
    trainer._update_pbar = lambda *args, **kwargs: None
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


def emlens_seconds(config: SAETrainConfig, out: Path) -> float:
    start = time.perf_counter()
    train_sae(config, out, progress=False)
    return time.perf_counter() - start


PEAK_SCRIPT = """
import json, resource, sys
from emlens.sae.train import SAETrainConfig, train_sae
train_sae(SAETrainConfig(**json.loads(sys.argv[1])), sys.argv[2], progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_mb(config: SAETrainConfig, out: Path) -> float:
    """Peak resident MB of a fresh process training `config`."""
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, json.dumps(config.model_dump()), str(out)],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def bench_sae(tokens: int = 100_000, store_tokens: int = 200_000, d_model: int = 576, expansion_factor: int = 8,
              k: int = 32, batch_size: int = 1024, repeats: int = 2, echo: Callable[[str], None] = print) -> dict:
    with tempfile.TemporaryDirectory(prefix="emlens-bench-sae-") as tmp:
        tmp = Path(tmp)
        one, four = random_store(tmp / "store-1x", store_tokens, d_model), random_store(tmp / "store-4x",
                                                                                    4 * store_tokens, d_model, seed=1)
        config = SAETrainConfig(store=str(one.folder), site=SITE, expansion_factor=expansion_factor, k=k,
                                tokens=tokens, batch_size=batch_size)
        vectors = one.load(SITE)
        ours, theirs = [], []
        for attempt in range(repeats):
            theirs.append(saelens_seconds(config, vectors))
            ours.append(emlens_seconds(config, tmp / f"sae-{attempt}"))
        del vectors
        echo(f"train {tokens} tokens, {d_model} x {d_model * expansion_factor} TopK k={k}: emlens {min(ours):.1f} s, "
             f"sae-lens from memory {min(theirs):.1f} s")
        memory = {name: peak_mb(config.model_copy(update={"store": str(store.folder)}), tmp / f"peak-{name}")
                  for name, store in (("1x", one), ("4x", four))}
        echo(f"peak resident memory: {memory['1x']:.0f} MB (store of {store_tokens} tokens), {memory['4x']:.0f} MB "
             f"(store of {4 * store_tokens} tokens)")
    figures = {"tokens_per_s": tokens / min(ours), "saelens_tokens_per_s": tokens / min(theirs),
               "vs_saelens": min(theirs) / min(ours), "peak_mb_1x": memory["1x"], "peak_mb_4x": memory["4x"],
               "memory_4x_vs_1x": memory["4x"] / memory["1x"]}
    echo(" ".join(f"{k}={v:.3f}" for k, v in figures.items()))
    return figures
