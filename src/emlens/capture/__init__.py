"""Activation capture: read the residual stream into memory or a sharded store."""
