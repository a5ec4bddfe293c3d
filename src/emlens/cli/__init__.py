"""`emlens ...`: a thin command-line layer over the Python API. Bad input ends in one line and exit code 2.

Every command module adds its commands to `app` when imported; they are imported here, explicitly.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

import typer
from pydantic import ValidationError

from emlens.base.errors import EmlensInputError
from emlens.cli import (  # noqa: F401  (registers their commands)
    capability,
    card,
    diff,
    eval,
    export,
    honesty,
    loop,
    probe,
    sae,
    serve,
    steer,
    study,
    tokens,
    train,
)
from emlens.cli.app import app


class _Stderr(logging.Handler):
    """Writes to whatever sys.stderr is at the time (a handler holding the stream at start would outlive it)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(f"[emlens] {record.getMessage()}\n")


def show_progress_messages() -> None:
    """The library logs what it is doing (settings, conditions, resumes); the CLI shows it on stderr."""
    logger = logging.getLogger("emlens")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
        logger.setLevel(logging.INFO)


def main(argv: Optional[list[str]] = None) -> None:
    show_progress_messages()
    try:
        app(args=argv, prog_name="emlens")
    except EmlensInputError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    except ValidationError as error:  # a config built without base.io.validate: still one line, same wording
        from emlens.base.io import describe_validation_error, fail

        typer.echo(f"error: {fail(error.title, describe_validation_error(error))}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished samples are kept; re-run the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
