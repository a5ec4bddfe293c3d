"""Steering and ablation with one SAE latent, through the same engine as every other intervention.

- Adding a latent is adding its decoder vector (`AddVector`), in units of the latent's mean activation when it
  fires (from `emlens sae eval`'s `latents.parquet`), so scale 1 is a typical firing.
- `AblateLatent` removes the latent's contribution at the SAE's site: h <- h - f_i(h) d_i, where f_i(h) is the
  latent's activation on h. The SAE's reconstruction error stays in h, so nothing else the SAE misses is lost.
  Each sequence's first token (the attention sink) is left alone unless asked, as with directional ablation.
  It is one `sae_ablate` op, so it runs on the hf engine and in vLLM's worker alike.
- The control is a random other latent, drawn among the latents that fire (seeded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from emlens.base.errors import EmlensInputError
from emlens.generation.ops import OpIntervention, SiteOp
from emlens.model import Model
from emlens.sae.artifact import LoadedSAE
from emlens.sae.quality import LATENTS_FILE


def check_latent(loaded: LoadedSAE, latent: int) -> int:
    if not 0 <= int(latent) < loaded.d_sae:
        raise EmlensInputError(f"{loaded.source}: latent {latent} out of range (the SAE has {loaded.d_sae})")
    return int(latent)


@dataclass
class AblateLatent(OpIntervention):
    """Subtract latent `latent`'s contribution f_i(h) d_i at the SAE's site, keeping the reconstruction error."""

    loaded: LoadedSAE
    latent: int
    name: str = "ablate_latent"
    first_token: bool = False

    def ops(self, model: Model) -> list[SiteOp]:
        """One `sae_ablate` op at the SAE's site (the hf engine and vLLM's worker both run it)."""
        site = self.loaded.check_fits(model)
        if site.kind == "resid_mid":  # its write point holds the attention output alone, not what the SAE reads
            raise EmlensInputError(f"{self.loaded.source}: an SAE on resid_mid cannot be ablated through (the stream "
                                   "there is not where its write goes); ablate latents of a resid_pre, resid_post, "
                                   "attn_out or mlp_out SAE")
        latent = check_latent(self.loaded, self.latent)
        return [SiteOp("sae_ablate", site.kind, site.layer, sae=self.loaded.sae, latent=latent,
                       skip_first_token=not self.first_token)]


def latent_statistics(loaded: LoadedSAE) -> pd.DataFrame | None:
    """The SAE's per-latent firing rate and mean activation when active, if `emlens sae eval` wrote them."""
    path = Path(loaded.source) / LATENTS_FILE
    return pd.read_parquet(path) if path.exists() else None


def natural_scale(loaded: LoadedSAE, latent: int) -> float:
    """A typical firing of the latent, as a norm: mean activation when active x |decoder vector|."""
    stats = latent_statistics(loaded)
    if stats is None:
        raise EmlensInputError(f"{loaded.source}: no {LATENTS_FILE} (run `emlens sae eval` on it first), or set "
                               "scale_unit: absolute")
    mean_active = float(stats.mean_when_active.iloc[latent])
    if mean_active <= 0:
        raise EmlensInputError(f"{loaded.source}: latent {latent} never fired in `emlens sae eval`'s tokens; "
                               "set scale_unit: absolute to steer with it anyway")
    return mean_active * float(loaded.decoder[latent].norm())


def random_latent(loaded: LoadedSAE, latent: int, seed: int = 0) -> int:
    """A random other latent that fires (any other one when no statistics were written)."""
    stats = latent_statistics(loaded)
    alive = np.arange(loaded.d_sae) if stats is None else stats.latent[stats.firing_rate > 0].to_numpy()
    candidates = alive[alive != latent]
    if not len(candidates):
        raise EmlensInputError(f"{loaded.source}: no other live latent to serve as the random control")
    return int(np.random.default_rng(seed).choice(candidates))
