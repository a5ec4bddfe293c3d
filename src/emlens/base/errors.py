"""One error type for bad user input: the CLI prints its message as a single line and exits non-zero."""

from __future__ import annotations


class EmlensInputError(ValueError):
    """Bad input from the user: a malformed file, an unknown field, an incompatible artifact.

    The message must name the file and the line or field, so one line tells the user what to fix.
    """
