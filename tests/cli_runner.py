"""Run the emlens CLI in-process and return its exit code (0 on success, 2 on bad input)."""
from emlens.cli import main


def run_cli(*args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code or 0
    return 0
