"""Layer 5: direction and probe artifacts, in-memory fitting, probe specs and their data."""
