"""common.atomic: leftovers of killed writes are recognised, skipped by scans and cleaned when stale."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from common.atomic import atomic_path, find_partial_files, is_partial_file, remove_partial_files

KILL_MID_WRITE = """
import os, signal, sys
from common.atomic import atomic_path
cm = atomic_path(sys.argv[1])
tmp = cm.__enter__()
open(tmp, "w").write("half a volume")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_9_leftover_recognised_and_cleaned_when_stale(tmp_path, repo_root):
    target = tmp_path / "case" / "ct.nii.gz"
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(target)], cwd=repo_root)
    assert proc.returncode == -9 and not target.exists()
    leftovers = find_partial_files(tmp_path)
    assert len(leftovers) == 1 and is_partial_file(leftovers[0])
    name = os.path.basename(leftovers[0])
    assert name.startswith(".ct.nii.gz.") and name.endswith(".part.nii.gz")
    assert remove_partial_files(tmp_path) == []  # fresh: it may belong to a live writer (another shard)
    old = time.time() - 7200
    os.utime(leftovers[0], (old, old))
    assert remove_partial_files(tmp_path) == leftovers and not os.path.exists(leftovers[0])


def test_partial_names():
    for name in (
        ".ct.nii.gz.k2j4h1x_.part.nii.gz",
        ".summary.json.abcdefgh.part.json",
        ".Makefile.a1b2c3d4.part",
    ):
        assert is_partial_file(name) and is_partial_file(f"/data/x/{name}"), name
    for name in ("ct.nii.gz", ".hidden.nii.gz", "ct.part.nii.gz", ".ct.nii.gz.part.nii.gz", "a.dcm"):
        assert not is_partial_file(name), name


def test_atomic_path_names_are_partial(tmp_path):
    with atomic_path(tmp_path / "x.h5") as tmp:
        assert is_partial_file(tmp)
        open(tmp, "w").close()
    assert (tmp_path / "x.h5").exists() and find_partial_files(tmp_path) == []
