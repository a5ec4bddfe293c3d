"""The field's quality figures of an SAE: fraction of variance explained, L0, dead and dense latents (on a
store's token vectors), and the next-token loss with the SAE spliced into the model, beside the clean and the
zero-ablation loss (loss recovered = (zero - spliced) / (zero - clean))."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from emlens.base.errors import EmlensInputError
from emlens.base.io import CFG_FILE, atomic_write_json, read_json
from emlens.capture.store import ActivationStore
from emlens.model import Model
from emlens.sae.train import SAE_FOLDER, token_batches
from emlens.sites import Site, hook_site, resolve_sites

DENSE_ABOVE = 0.1  # a latent active on more than this share of tokens is dense


def load_sae(folder: str | Path):
    """An SAE artifact's sae-lens SAE (or any folder in the sae-lens on-disk format)."""
    from sae_lens import SAE

    folder = Path(folder)
    files = folder / SAE_FOLDER if (folder / SAE_FOLDER).is_dir() else folder
    if not (files / "cfg.json").exists():
        raise EmlensInputError(f"{folder}: not an SAE folder (no {SAE_FOLDER}/cfg.json or cfg.json)")
    return SAE.load_from_disk(str(files), device="cpu")


@torch.inference_mode()
def reconstruction_figures(sae, store: ActivationStore, site: str, tokens: int = 20_000) -> dict:
    """FVE, L0, dead and dense latents over up to `tokens` of the store's token vectors (first tokens left out)."""
    seen, squared_error, total = 0, 0.0, []
    active = torch.zeros(sae.cfg.d_sae)
    l0 = 0.0
    for batch in token_batches(store, site, 1024, 1024, seed=0):
        latents = sae.encode(batch)
        error = batch - sae.decode(latents)
        squared_error += float((error ** 2).sum())
        total.append(batch)
        firing = latents > 0
        active += firing.sum(0)
        l0 += float(firing.sum())
        seen += len(batch)
        if seen >= tokens:
            break
    vectors = torch.cat(total)
    variance = float(((vectors - vectors.mean(0)) ** 2).sum())
    rate = active / seen
    return {"tokens": seen, "fve": 1 - squared_error / variance, "l0": l0 / seen,
            "dead_fraction": float((rate == 0).float().mean()), "dense_fraction": float((rate > DENSE_ABOVE).float().mean())}


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


def evaluate_sae(folder: str | Path, store: str | Path | None = None, handle: Model | None = None,
                 texts: list[str] | None = None, tokens: int = 20_000) -> dict:
    """The quality figures of an SAE artifact, written into its cfg.json (`quality`) and returned."""
    folder = Path(folder)
    cfg = read_json(folder / CFG_FILE)
    sae = load_sae(folder)
    site_name = cfg["config"]["site"]
    activation_store = ActivationStore(store or cfg["config"]["store"])
    if activation_store.d_model != sae.cfg.d_in:
        raise EmlensInputError(f"{folder}: SAE width {sae.cfg.d_in} does not match the store's d_model "
                               f"{activation_store.d_model}")
    figures = reconstruction_figures(sae, activation_store, site_name, tokens)
    if handle is not None and texts:
        if handle.d_model != sae.cfg.d_in:
            raise EmlensInputError(f"{folder}: SAE width {sae.cfg.d_in} does not match the model's d_model "
                                   f"{handle.d_model}")
        figures.update(spliced_loss(sae, handle, resolve_sites([site_name], handle.n_layers)[0], texts))
    atomic_write_json(folder / CFG_FILE, {**cfg, "quality": figures})
    return figures
