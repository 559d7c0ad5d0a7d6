"""Atomic file writes: write to a temporary sibling, then ``os.replace`` onto the target.

A crash or a Ctrl-C mid-write never leaves a half-written output that a resumable job would
later mistake for a finished one. A ``kill -9`` can still leave the hidden temporary sibling
(``.<name>.<8 random chars>.part<suffixes>``): :func:`is_partial_file` recognises such leftovers so
folder scans skip them, and :func:`remove_partial_files` deletes stale ones on the next run.

Finished files get the mode a plain ``open(path, "w")`` would give them (``0o666`` minus the umask),
not the ``0600`` of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator

PARTIAL_MARKER = ".part"
# mkstemp's random part is 8 characters of [a-z0-9_]; the target's suffixes (.nii.gz, .h5) follow ".part"
_PARTIAL_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.part(\.[A-Za-z0-9_-]+){0,2}$")
DEFAULT_STALE_S = 3600.0  # a temporary file untouched for an hour belongs to a dead writer
_umask_lock = threading.Lock()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    The temporary name keeps the target's suffixes (``.nii.gz``, ``.h5``) so writers that pick the
    format from the extension still work. On any exception the temporary file is removed. The
    finished file's mode follows the umask (as ``open()`` would create it).
    """
    target = os.fspath(target)
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(target)
    suffix = "".join(_suffixes(base))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=PARTIAL_MARKER + suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        if os.path.exists(tmp):  # writers that replace the file themselves (np.save to a path) keep theirs
            os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _umask_lock:  # os.umask can only be read by setting it: keep the window closed to our threads
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def is_partial_file(path: str | os.PathLike) -> bool:
    """True for a temporary file of :func:`atomic_path` (``.ct.nii.gz.k2j4h1x_.part.nii.gz``).

    Such a file exists only while a write is in progress or after a writer was killed; it is never
    a finished input. Folder scans (DICOM discovery, ``data_prep.analyze``, ``build_pairs``) skip it.
    """
    return bool(_PARTIAL_RE.match(os.path.basename(os.fspath(path))))


def find_partial_files(folder: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Every :func:`is_partial_file` under ``folder`` (sorted paths)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    if recursive:
        found = [os.path.join(root, n) for root, _, names in os.walk(folder) for n in names]
    else:
        found = [os.path.join(folder, n) for n in os.listdir(folder)]
    return sorted(p for p in found if is_partial_file(p) and os.path.isfile(p))


def remove_partial_files(
    folder: str | os.PathLike, recursive: bool = True, min_age_s: float = DEFAULT_STALE_S
) -> list[str]:
    """Delete leftovers of killed atomic writes under ``folder``; returns the removed paths.

    Only files not modified for ``min_age_s`` seconds are removed, so a write that another process
    (a parallel shard) has in progress right now is left alone; ``min_age_s=0`` removes all of them.
    """
    now = time.time()
    removed = []
    for path in find_partial_files(folder, recursive):
        with contextlib.suppress(FileNotFoundError):
            if now - os.path.getmtime(path) >= float(min_age_s):
                os.remove(path)
                removed.append(path)
    return removed


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
