"""Secret keys read from the environment or from a private key file, checked the same way wherever they are used.

Used by the pseudonym key of the data tools (:mod:`common.pseudonym`) and by the PerX2CT server's
authentication key: a key file that others can read, or that another user could have swapped in, leaks or
controls the key, so it is refused with the file named rather than read.
"""

from __future__ import annotations

import errno
import os
import stat

from common.errors import InputError

MIN_KEY_BYTES = 16  # shortest key accepted from the environment or a file (128 bits of a random key)
MAX_KEY_FILE_BYTES = 4096  # what is read of a key file (a key is 64 hex digits)


def env_key(name: str) -> bytes | None:
    """The key in ``$name`` (None when unset or empty); :class:`InputError` when shorter than ``MIN_KEY_BYTES``."""
    value = os.environ.get(name)
    if not value:
        return None
    key = value.encode()
    if len(key) < MIN_KEY_BYTES:
        raise InputError(None, f"${name} is {len(key)} bytes; use at least {MIN_KEY_BYTES}")
    return key


def read_private_key(
    path: str | os.PathLike, label: str = "key", hint: str = "", follow_symlinks: bool = True
) -> bytes:
    """The key in ``path``, surrounding whitespace stripped: a regular file you own, mode 0600 or stricter.

    Errors are :class:`InputError` naming the file, worded "<label> file ..." (not found, not a regular file,
    mode readable by others, another user's) or "<label> is N bytes; use at least 16" + ``hint``. With
    ``follow_symlinks`` False a link is refused as not a regular file.
    """
    path = os.fspath(path)
    # checked on the descriptor that is read (no swap between the check and the read); O_NONBLOCK so that
    # a FIFO planted at the path is refused instead of blocking the open
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InputError(path, f"{label} file not found") from None
    except OSError as e:
        if e.errno != errno.ELOOP:  # ELOOP: a link, refused with follow_symlinks False
            raise InputError(path, f"{label} file cannot be opened: {e.strerror}") from None
        raise InputError(path, f"{label} file is not a regular file") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(path, f"{label} file is not a regular file")
        if info.st_mode & 0o077:
            raise InputError(
                path, f"{label} file has mode {stat.S_IMODE(info.st_mode):04o}: others may read it; chmod 600 it"
            )
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise InputError(path, f"{label} file belongs to another user")
        key = os.read(fd, MAX_KEY_FILE_BYTES).strip()
    finally:
        os.close(fd)
    if len(key) < MIN_KEY_BYTES:
        raise InputError(path, f"{label} is {len(key)} bytes; use at least {MIN_KEY_BYTES}{hint}")
    return key
