"""common.keys: one reader for the pseudonym key and the server key; every refusal names the file and why."""

from __future__ import annotations

import os

import pytest

from common.errors import InputError
from common.keys import MIN_KEY_BYTES, env_key, read_private_key

KEY = b"0123456789abcdef" * 4


def _file(path, content=KEY, mode=0o600):
    path.write_bytes(content)
    os.chmod(path, mode)
    return path


def _link(path):
    os.symlink(_file(path.with_name("target")), path)
    return path


def _fifo(path):
    os.mkfifo(path, 0o600)
    return path


def _other_users(path):
    if os.getuid() != 0:
        pytest.skip("changing a file's owner needs root")
    _file(path)
    os.chown(path, os.getuid() + 4242, -1)
    return path


@pytest.mark.parametrize(
    "make, follow, message",
    [
        (lambda p: p, True, "key file not found"),
        (lambda p: (p.mkdir(mode=0o700), p)[1], True, "key file is not a regular file"),
        (_fifo, True, "key file is not a regular file"),
        (_link, False, "key file is not a regular file"),
        (lambda p: _file(p, mode=0o644), True, "key file has mode 0644: others may read it"),
        (lambda p: _file(p, mode=0o640), True, "key file has mode 0640"),
        (lambda p: _file(p, b"  short \n"), True, "key is 5 bytes; use at least 16 !hint"),
        (lambda p: _file(p, b""), True, "key is 0 bytes"),
        (_other_users, True, "key file belongs to another user"),
    ],
)
def test_refused_key_files_name_the_file_and_the_problem(tmp_path, make, follow, message):
    path = make(tmp_path / "key")
    with pytest.raises(InputError) as info:
        read_private_key(path, "key", hint=" !hint", follow_symlinks=follow)
    assert message in str(info.value) and str(path) in str(info.value)


def test_accepted_key_files(tmp_path):
    assert read_private_key(_file(tmp_path / "k", b"\n" + KEY + b"  \n")) == KEY
    assert read_private_key(_link(tmp_path / "link"), follow_symlinks=True) == KEY
    assert read_private_key(_file(tmp_path / "min", b"x" * MIN_KEY_BYTES, 0o400)) == b"x" * MIN_KEY_BYTES


@pytest.mark.parametrize("value, expected", [(None, None), ("", None), ("y" * 16, b"y" * 16), ("short", "5 bytes")])
def test_env_key(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("XRAY2CT_TEST_KEY", raising=False)
    else:
        monkeypatch.setenv("XRAY2CT_TEST_KEY", value)
    if isinstance(expected, str):
        with pytest.raises(InputError, match=f"XRAY2CT_TEST_KEY is {expected}; use at least 16"):
            env_key("XRAY2CT_TEST_KEY")
    else:
        assert env_key("XRAY2CT_TEST_KEY") == expected
