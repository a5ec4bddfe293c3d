"""Layer 7: benchmarks that print ratios; each ends with one line of key=value pairs."""
