"""An SAE and where it reads: an emlens SAE artifact, any folder in the sae-lens on-disk format, or a
`release:sae_id` of the sae-lens registry (downloaded by sae-lens, so online only).

    sae = load_sae("artifacts/sae/l15")          # or "gemma-scope-2b-pt-res-canonical:layer_20/width_16k/canonical"
    sae.check_fits(handle)                        # one-line error for another width or a layer the model lacks
    latents = sae.encode(vectors)                 # (n, d_sae)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from emlens.base.errors import EmlensInputError
from emlens.base.io import CFG_FILE, read_json, register_artifact
from emlens.model import Model
from emlens.sites import Site, resolve_sites

SAE_KIND = "sae"
SAE_FOLDER = "sae"  # the sae-lens files, inside an emlens SAE artifact


@dataclass
class LoadedSAE:
    """A sae-lens SAE with the site it reads and writes (`blocks.L.hook_KIND`)."""

    sae: object  # sae_lens.SAE
    site_name: str
    source: str
    cfg: dict = field(default_factory=dict)  # the emlens artifact's cfg.json ({} for a plain sae-lens SAE)

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def decoder(self) -> Tensor:
        """(d_sae, d_in): each latent's write direction."""
        return self.sae.W_dec.detach().float()

    def site(self, n_layers: int) -> Site:
        return resolve_sites([self.site_name], n_layers)[0]

    def check_fits(self, handle: Model) -> Site:
        """The SAE's site on this model; one line when the widths differ or the model lacks the layer."""
        if handle.d_model != self.d_in:
            raise EmlensInputError(f"{self.source}: SAE width {self.d_in} does not match the model's d_model "
                                   f"{handle.d_model} ({handle.spec})")
        try:
            return self.site(handle.n_layers)
        except EmlensInputError as error:
            raise EmlensInputError(f"{self.source}: SAE site {self.site_name}: {error}") from None

    @torch.inference_mode()
    def encode(self, vectors: Tensor, batch_size: int = 4096) -> Tensor:
        """Latent activations of (n, d_in) vectors, in batches (float32, on the CPU)."""
        parts = [self.sae.encode(chunk.float()) for chunk in vectors.split(batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, self.d_sae)


def load_sae(source: str | Path) -> LoadedSAE:
    """An SAE from an emlens artifact folder, a sae-lens folder, or `release:sae_id` of the sae-lens registry."""
    from sae_lens import SAE

    path = Path(source).expanduser()
    if path.exists():
        cfg = read_json(path / CFG_FILE) if (path / CFG_FILE).exists() else {}
        if cfg.get("kind") == SAE_KIND:
            if not (path / SAE_FOLDER / CFG_FILE).exists():
                raise EmlensInputError(f"{path}: the SAE's training has not finished (re-run `emlens sae train` "
                                       "with the same config to resume it)")
            sae = SAE.load_from_disk(str(path / SAE_FOLDER), device="cpu")
            return LoadedSAE(sae, cfg["config"]["site"], str(path), cfg)
        if "d_sae" not in cfg:
            raise EmlensInputError(f"{path}: not an SAE folder (no emlens SAE cfg.json, no sae-lens cfg.json)")
        sae = SAE.load_from_disk(str(path), device="cpu")
        return LoadedSAE(sae, _hook_name(sae, str(path)), str(path))
    release, _, sae_id = str(source).partition(":")
    if not sae_id:
        raise EmlensInputError(f"{source}: no such SAE folder (a registry SAE is written RELEASE:SAE_ID)")
    try:
        sae = SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as error:  # unknown release, or offline: sae-lens raises many kinds
        raise EmlensInputError(f"{source}: cannot load from the sae-lens registry "
                               f"({type(error).__name__}: {str(error).splitlines()[0][:160]})") from None
    return LoadedSAE(sae, _hook_name(sae, str(source)), str(source))


def _hook_name(sae, source: str) -> str:
    hook = getattr(sae.cfg.metadata, "hook_name", None)
    if not hook:
        raise EmlensInputError(f"{source}: the SAE's cfg names no hook (metadata.hook_name), so its site is unknown")
    return str(hook)


@register_artifact(SAE_KIND)
def open_sae(folder: Path) -> LoadedSAE:
    """`em.load(FOLDER)` of an SAE artifact."""
    return load_sae(folder)
