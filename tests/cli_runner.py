"""Run the emlens CLI in-process and return its exit code (0 on success, 2 on bad input)."""
from emlens.cli import main


def run_cli(*args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code or 0
    return 0


def one_line_error(capsys, code: int) -> str:
    """Bad input ends in exit code 2 and one line on stderr, never a traceback; returns that line."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err
