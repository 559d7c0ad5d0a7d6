"""Atomic file writes: write to a temporary sibling, then ``os.replace`` onto the target.

A crash or a Ctrl-C mid-write never leaves a half-written output that a resumable job would
later mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    The temporary name keeps the target's suffixes (``.nii.gz``, ``.h5``) so writers that pick the
    format from the extension still work. On any exception the temporary file is removed.
    """
    target = os.fspath(target)
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(target)
    suffix = "".join(_suffixes(base))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".part" + suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")[1:]
    return (
        ["." + p for p in parts[-2:]]
        if name.endswith((".nii.gz", ".tar.gz"))
        else ["." + p for p in parts[-1:]]
    )


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(target) as tmp, open(tmp, "w") as f:
        f.write(text)
