"""Layer 5: sparse autoencoders (sae-lens) on emlens's activation stores: train, evaluate."""
