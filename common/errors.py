"""One exception type for bad user input, so every tool reports "<file>: <problem>" the same way."""

from __future__ import annotations

import os


class InputError(ValueError):
    """Bad input data: names the offending file (when there is one) and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def require_file(path: str | os.PathLike) -> str:
    """Return ``path`` as str, raising :class:`InputError` if it does not exist."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    return path
