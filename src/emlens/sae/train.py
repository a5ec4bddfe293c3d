"""Train a sparse autoencoder with sae-lens on one site's activations, streamed from an activation store.

sae-lens does the SAE and the training loop (`SAETrainer`, its TopK / BatchTopK / ReLU / JumpReLU training
SAEs); emlens feeds it: the store's token vectors at one site (a store read at position `all`), shard by
shard through a shuffling buffer, never all in memory, each sequence's first token (the attention sink, whose
norm is outsized) left out. Padding never reaches a store.

The result is an emlens artifact folder: `cfg.json` (kind `sae`: the run's config, the store's model, the
quality figures of `emlens sae eval`) and `sae/`, the SAE in the sae-lens on-disk format
(`SAE.load_from_disk(OUT / "sae")` reads it; its metadata names the hook, so the folder alone says where it reads).
While training, sae-lens's checkpoints (weights, optimiser, sparsity statistics) go to `OUT/checkpoints/`; a
killed run re-run with the same command resumes from the last complete one, and they are removed at the end.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field
from safetensors import safe_open
from torch import Tensor

from emlens.base.config import PATH, Config
from emlens.base.errors import EmlensInputError
from emlens.base.io import (
    CFG_FILE,
    FORMAT_VERSION,
    atomic_write_json,
    check_writable_folder,
    folder_beside,
    read_json,
    swap_in,
    versions,
    write_manifest,
)
from emlens.capture.store import ActivationStore
from emlens.sae.artifact import SAE_FOLDER, SAE_KIND

CHECKPOINTS = "checkpoints"
# what sae-lens writes into a checkpoint, the trainer state last
CHECKPOINT_FILES = ("sae_weights.safetensors", "cfg.json", "activation_scaler.json", "trainer_state.pt")
ARCHITECTURES = ("topk", "batchtopk", "standard", "jumprelu")


class SAETrainConfig(Config):
    """What an SAE run is: its data (store + site), its shape and its optimisation."""

    store: Annotated[str, PATH]  # an activation store read at position `all` (one vector per token)
    site: str  # e.g. blocks.15.hook_resid_post
    architecture: Literal["topk", "batchtopk", "standard", "jumprelu"] = "topk"
    expansion_factor: int = Field(8, ge=1)
    k: int = Field(32, ge=1)  # topk / batchtopk
    l1_coefficient: float = Field(5.0, gt=0)  # standard / jumprelu
    lr: float = Field(4e-3, gt=0)  # embedded model, layer 15, 200k tokens: FVE 0.81 at 4e-3, 0.70 at 4e-4
    lr_decay_fraction: float = Field(0.5, ge=0, lt=1)  # the last share of steps decays the lr to a tenth
    tokens: int = Field(200_000, ge=1)
    batch_size: int = Field(1024, ge=1)
    buffer_tokens: int = Field(32_768, ge=1)  # shuffled together; bounds memory
    seed: int = 0
    # A latent that has not fired for this many steps is dead and gets the TopK auxiliary loss (AuxK). sae-lens's
    # default, 1,000 steps, exceeds a 200k-token run's 195: on the embedded model (layer 15, held-out tokens) a
    # window of 50 steps revived latents (dead 67 % -> 27 %) but explained less (FVE 0.82 -> 0.77).
    dead_feature_window: int = Field(1000, ge=1)
    checkpoints: int = Field(4, ge=0)  # saved evenly through the run; a killed run resumes from the last


def token_batches(store: ActivationStore, site: str, batch_size: int, buffer_tokens: int, seed: int,
                  keep_first_token: bool = False) -> Iterator[Tensor]:
    """Batches of one site's token vectors, forever: each epoch reads the shards in a seeded random order (a
    store is written in its rows' order, often grouped by question) and shuffles within a buffer of shards.
    A store that is not per-token, or lacks the site, fails here, before any work."""
    if store.position != "all":
        raise EmlensInputError(f"{store.folder}: an SAE trains on every token; this store was read at position "
                               f"'{store.position}' (extract with --position all)")
    store._check_site(site)
    return _stream(store, site, batch_size, buffer_tokens, seed, keep_first_token)


def _stream(store: ActivationStore, site: str, batch_size: int, buffer_tokens: int, seed: int,
            keep_first_token: bool) -> Iterator[Tensor]:
    firsts = set(store.index["vector_start"].tolist())  # each row's first vector: its sequence's first token
    generator = torch.Generator().manual_seed(seed)
    buffer: list[Tensor] = []
    while True:
        for i in torch.randperm(len(store.manifest["shards"]), generator=generator).tolist():
            shard = store.manifest["shards"][i]
            with safe_open(str(store.folder / shard["file"]), framework="pt") as f:
                vectors = f.get_tensor(site).float()
            start = shard["vector_start"]
            if not keep_first_token:
                keep = torch.tensor([start + i not in firsts for i in range(len(vectors))])
                vectors = vectors[keep]
            buffer.append(vectors)
            if sum(len(b) for b in buffer) >= buffer_tokens:
                yield from _shuffled(torch.cat(buffer), batch_size, generator)
                buffer = []
        if buffer:
            yield from _shuffled(torch.cat(buffer), batch_size, generator)
            buffer = []


def _shuffled(vectors: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(len(vectors), generator=generator)
    for begin in range(0, len(order) - batch_size + 1, batch_size):
        yield vectors[order[begin:begin + batch_size]]


def training_sae(config: SAETrainConfig, d_in: int):
    """The sae-lens training SAE of the configured architecture."""
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )

    d_sae = d_in * config.expansion_factor
    if config.architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=config.k))
    if config.architecture == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=config.k))
    if config.architecture == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae,
                                                             l1_coefficient=config.l1_coefficient))
    return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae,
                                                         l0_coefficient=config.l1_coefficient))


def sae_lens_trainer_config(config: SAETrainConfig, **extra):
    """sae-lens's trainer settings for a run (the benchmark gives its baseline the same)."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    return SAETrainerConfig(
        total_training_samples=config.tokens, train_batch_size_samples=config.batch_size, lr=config.lr,
        lr_end=config.lr / 10, lr_decay_steps=int(config.lr_decay_fraction * config.tokens // config.batch_size),
        device="cpu", logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=1,
        dead_feature_window=config.dead_feature_window, **extra)


def train_sae(config: SAETrainConfig, out: str | Path, progress: bool = True) -> Path:
    """Train the SAE at `out` (sae-lens format in `out/sae`), resuming from the last checkpoint there."""
    from sae_lens.training.sae_trainer import SAETrainer

    out = Path(out)
    store = ActivationStore(config.store)
    cfg = _open_run(out, config, store)
    if cfg.get("finished"):
        return out
    torch.manual_seed(config.seed)
    sae = training_sae(config, store.d_model)
    sae.cfg.metadata.hook_name = config.site
    sae.cfg.metadata.model_name = store.manifest.get("model", {}).get("model")
    trainer_config = sae_lens_trainer_config(config, n_checkpoints=config.checkpoints,
                                             checkpoint_path=str(out / CHECKPOINTS))
    batches = token_batches(store, config.site, config.batch_size, config.buffer_tokens, config.seed)
    trainer = SAETrainer(cfg=trainer_config, sae=sae, data_provider=batches)
    last = last_checkpoint(out / CHECKPOINTS)
    if last is not None:
        sae.load_weights_from_checkpoint(last)
        trainer.load_trainer_state(last)
        trainer.n_training_steps += 1  # sae-lens checkpoints after a step but before counting it
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t > trainer.n_training_samples]
        for _ in range(trainer.n_training_steps):  # the stream is seeded: pick up where the run stopped
            next(batches)
    if not progress:
        trainer._update_pbar = lambda *args, **kwargs: None
    trained = trainer.fit()
    tmp = folder_beside(out / SAE_FOLDER)
    trained.save_inference_model(str(tmp))
    swap_in(tmp, out / SAE_FOLDER)
    atomic_write_json(out / CFG_FILE, {**cfg, "steps": trainer.n_training_steps, "finished": True,
                                       "resumed_from": None if last is None else last.name})
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return out


def _open_run(out: Path, config: SAETrainConfig, store: ActivationStore) -> dict:
    """OUT/cfg.json, written before training so a killed run resumes; another config there is refused."""
    check_writable_folder(out, SAE_KIND)
    cfg = {"kind": SAE_KIND, "format_version": FORMAT_VERSION, "config": config.model_dump(),
           "model": store.manifest.get("model", {}), "finished": False, "versions": versions()}
    if (out / CFG_FILE).exists():
        earlier = read_json(out / CFG_FILE)
        if earlier.get("config") != cfg["config"]:
            raise EmlensInputError(f"{out}: holds an SAE trained with another config; use a new --out folder")
        return earlier
    write_manifest(out, cfg)
    return cfg


def last_checkpoint(folder: Path) -> Path | None:
    """The checkpoint with the most training samples whose files are all there (a kill may cut one short)."""
    complete = [c for c in folder.glob("*") if c.name.isdigit() and all((c / f).exists() for f in CHECKPOINT_FILES)]
    return max(complete, key=lambda c: int(c.name), default=None)
