"""Layer 3: the generation engine, the intervention protocol, and exact answer distributions and ratings."""
