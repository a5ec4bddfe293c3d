"""CLI command modules: each imports `emlens.cli.app` and registers its commands on it (see cli.register_commands)."""
