"""The field's quality figures of an SAE: fraction of variance explained, L0, dead and dense latents (on a
store's token vectors), and the next-token loss with the SAE spliced into the model, beside the clean and the
zero-ablation loss (loss recovered = (zero - spliced) / (zero - clean))."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from emlens.base.errors import EmlensInputError
from emlens.base.io import CFG_FILE, atomic_write_json, atomic_write_table
from emlens.capture.store import ActivationStore
from emlens.model import Model
from emlens.sae.artifact import load_sae
from emlens.sae.train import token_batches
from emlens.sites import Site, hook_site

DENSE_ABOVE = 0.1  # a latent active on more than this share of tokens is dense
LATENTS_FILE = "latents.parquet"  # per latent: firing rate, mean activation when active


@torch.inference_mode()
def reconstruction_figures(sae, store: ActivationStore, site: str, tokens: int = 20_000
                           ) -> tuple[dict, pd.DataFrame]:
    """FVE, L0, dead and dense latents over up to `tokens` of the store's token vectors (first tokens left out),
    and per latent its firing rate and mean activation when it fires."""
    seen, squared_error, total, l0 = 0, 0.0, [], 0.0
    fired, summed = torch.zeros(sae.cfg.d_sae), torch.zeros(sae.cfg.d_sae)
    for batch in token_batches(store, site, 1024, 1024, seed=0):
        latents = sae.encode(batch)
        squared_error += float(((batch - sae.decode(latents)) ** 2).sum())
        total.append(batch)
        firing = latents > 0
        fired += firing.sum(0)
        summed += latents.sum(0)
        l0 += float(firing.sum())
        seen += len(batch)
        if seen >= tokens:
            break
    vectors = torch.cat(total)
    variance = float(((vectors - vectors.mean(0)) ** 2).sum())
    rate = fired / seen
    figures = {"tokens": seen, "fve": 1 - squared_error / variance, "l0": l0 / seen,
               "dead_fraction": float((rate == 0).float().mean()),
               "dense_fraction": float((rate > DENSE_ABOVE).float().mean())}
    latents = pd.DataFrame({"latent": range(sae.cfg.d_sae), "firing_rate": rate.numpy(),
                            "mean_when_active": (summed / fired.clamp(min=1)).numpy()})
    return figures, latents


@torch.inference_mode()
def spliced_loss(sae, handle: Model, site: Site, texts: list[str]) -> dict:
    """Mean next-token loss over `texts`: clean, with the site replaced by the SAE's reconstruction (the first
    token left alone), and with the site zeroed."""
    def run(replace) -> float:
        handles = [] if replace is None else [hook_site(handle.base_model, site.layer, site.kind, replace, write=True)]
        try:
            losses = []
            for text in texts:
                ids = handle.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(handle.device)
                losses.append(float(handle.model(input_ids=ids, labels=ids).loss))
            return sum(losses) / len(losses)
        finally:
            for h in handles:
                h.remove()

    def spliced(hidden: Tensor) -> Tensor:
        rebuilt = sae.decode(sae.encode(hidden.float())).to(hidden.dtype)
        rebuilt[:, :1] = hidden[:, :1]
        return rebuilt

    def zeroed(hidden: Tensor) -> Tensor:
        out = torch.zeros_like(hidden)
        out[:, :1] = hidden[:, :1]
        return out

    clean, with_sae, zero = run(None), run(spliced), run(zeroed)
    recovered = (zero - with_sae) / (zero - clean) if zero != clean else float("nan")
    return {"loss_clean": clean, "loss_spliced": with_sae, "loss_zero_ablation": zero, "loss_recovered": recovered}


def evaluate_sae(source: str | Path, store: str | Path | None = None, handle: Model | None = None,
                 texts: list[str] | None = None, tokens: int = 20_000) -> dict:
    """The quality figures of any SAE (`load_sae` sources), on a store's tokens and, with a model and texts, the
    spliced loss. They go into an emlens SAE artifact's cfg.json (`quality`), or `emlens_quality.json` beside a
    plain sae-lens folder, and are returned."""
    loaded = load_sae(source)
    store = store or loaded.cfg.get("config", {}).get("store")
    if store is None:
        raise EmlensInputError(f"{source}: not trained by emlens, so give --store (a store read at position all "
                               f"with site {loaded.site_name})")
    activation_store = ActivationStore(store)
    if activation_store.d_model != loaded.d_in:
        raise EmlensInputError(f"{source}: SAE width {loaded.d_in} does not match the store's d_model "
                               f"{activation_store.d_model}")
    figures, latents = reconstruction_figures(loaded.sae, activation_store, loaded.site_name, tokens)
    figures["store"] = str(activation_store.folder)  # held out only when it is not the training store
    if handle is not None and texts:
        figures.update(spliced_loss(loaded.sae, handle, loaded.check_fits(handle), texts))
    folder = Path(loaded.source)
    if loaded.cfg:
        atomic_write_table(latents, folder / LATENTS_FILE)
        atomic_write_json(folder / CFG_FILE, {**loaded.cfg, "quality": figures})
    elif folder.is_dir():
        atomic_write_json(folder / "emlens_quality.json", figures)
    return figures
