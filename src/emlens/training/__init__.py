"""Layer 6: LoRA fine-tuning into checkpoint series, mixture and dataset sweeps."""
