"""Pseudonymous case and patient ids for data that came from patients (DICOM series).

A DICOM header carries who the patient is (PatientID, PatientName, PatientBirthDate, ...). Case ids end up
in every datalist, metrics report and summary, and those files are shared, so data tools replace ids
derived from DICOM with keyed hashes: ``HMAC-SHA256(key, kind + value)``, the first 16 hex digits (64 bits).
Without the key a pseudonym cannot be reversed or confirmed by guessing an id (a plain hash of a
six-digit PatientID could be). The same key gives the same pseudonyms, so a rerun resumes and all of a
patient's scans keep one patient pseudonym (per-patient splits still group them).

The key comes from ``$XRAY2CT_PSEUDONYM_KEY`` (at least 16 bytes), else from a key file (yours, mode 0600,
created with a new random 256-bit key when missing). The mapping pseudonym -> original is written only to
a private file (mode 0600) by :func:`write_private_json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import tempfile

from common.keys import env_key, read_private_key

KEY_ENV = "XRAY2CT_PSEUDONYM_KEY"
DIGITS = 16  # hex digits kept: 64 bits, collisions need ~4e9 cases


def load_or_create_key(key_file: str | os.PathLike) -> bytes:
    """The key from ``$XRAY2CT_PSEUDONYM_KEY``, else ``key_file`` (created, mode 0600, when missing).

    A key file must be a regular file you own that nobody else can read; otherwise :class:`InputError`.
    """
    key = env_key(KEY_ENV)
    if key:
        return key
    path = os.path.abspath(os.fspath(key_file))
    if not os.path.lexists(path):
        # written whole to a 0600 temporary file, then linked into place: a parallel part of the same build
        # either wins the link or reads the finished key of the one that did, never an empty file
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", suffix=".part", dir=os.path.dirname(path)
        )
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.remove(tmp)
    return read_private_key(path, "pseudonym key", follow_symlinks=False)


def pseudonym(key: bytes, kind: str, value: str, prefix: str = "") -> str:
    """``prefix`` + 16 hex digits of HMAC-SHA256(key, ``kind`` NUL ``value``); ``kind`` separates id spaces."""
    digest = hmac.new(key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()
    return prefix + digest[:DIGITS]


def write_private_json(path: str | os.PathLike, obj) -> str:
    """Write ``obj`` as JSON atomically with mode 0600 (whatever the umask): it holds patient identifiers.

    The temporary sibling is mkstemp's (0600, named as :mod:`common.atomic` names its partial files) and
    keeps its mode through ``os.replace``, so the content is never readable by others, not even briefly.
    """
    path = os.path.abspath(os.fspath(path))
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".part.json", dir=os.path.dirname(path)
    )
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path
