"""Layer 6: what the stages' outputs say: dose-response curves, cross-checkpoint comparison, monitoring, reports."""
