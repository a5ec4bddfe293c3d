"""Layer 4: interventions on the residual stream (add, ablate, compose, random control) and LoRA weight ablation."""
