"""Layer 5: the eval stage: config, the behavioural settings, judging, summaries."""
