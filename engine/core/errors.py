"""User-facing errors: bad input is reported with the file it came from and what is wrong with it."""

from __future__ import annotations

import os


class InputError(ValueError):
    """Bad user input. ``str(err)`` names the source (a file path or an option) and the problem.

    The CLI prints this message and exits non-zero instead of showing a traceback.
    """

    def __init__(self, source: str | os.PathLike | None, problem: str):
        self.source = None if source is None else os.fspath(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}" if self.source else problem)
