"""Layer 1: errors, file io (one-line errors, atomic writes, artifact folders), statistics, the version."""
