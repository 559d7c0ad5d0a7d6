"""Issue 23, round 2 of the hostile-file review: each test reproduces one attack that main accepted.

Items: 2 (HDF5 reading other files), 3 (NIfTI header extensions inflating before any check),
9 (DICOM pixel decode memory bounded by bits allocated), 10 (spreadsheet formulas in CSV cells),
11 (sheared / rank-deficient affines), 13 (patient identifiers in shareable outputs).
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from common.errors import InputError
from common.io import load_volume, save_volume
from common.volume import Volume


# ------------------------------------------------------------------------------------- item 2: HDF5 storage
def _h5_with_attrs(path, **kwargs):
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("ct", **kwargs)
        ds.attrs["affine"] = np.eye(4)
    return path


def _external_storage(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 2)
    return _h5_with_attrs(
        tmp_path / "external.h5", shape=(4, 4, 4), dtype="u1", external=[(str(secret), 0, 64)]
    ), "external file"


def _external_link(tmp_path):
    other = save_volume(Volume.from_spacing(np.ones((4, 4, 4), np.float32)), tmp_path / "other.h5")
    path = tmp_path / "extlink.h5"
    with h5py.File(path, "w") as f:
        f["ct"] = h5py.ExternalLink(other, "/ct")
    return path, "ExternalLink"


def _soft_link(tmp_path):
    path = tmp_path / "soft.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("real", data=np.ones((4, 4, 4), np.float32)).attrs["affine"] = np.eye(4)
        f["ct"] = h5py.SoftLink("/real")
    return path, "SoftLink"


def _virtual(tmp_path):
    other = save_volume(Volume.from_spacing(np.ones((4, 4, 4), np.float32)), tmp_path / "source.h5")
    layout = h5py.VirtualLayout(shape=(4, 4, 4), dtype=np.float32)
    layout[:] = h5py.VirtualSource(other, "ct", shape=(4, 4, 4))
    path = tmp_path / "virtual.h5"
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("ct", layout).attrs["affine"] = np.eye(4)
    return path, "virtual dataset"


@pytest.mark.parametrize("make", [_external_storage, _external_link, _soft_link, _virtual])
def test_hdf5_reading_other_files_is_refused(tmp_path, make):
    """main returned /etc/passwd's bytes as voxels for external storage, and followed every link."""
    path, problem = make(tmp_path)
    with pytest.raises(InputError, match=problem) as err:
        load_volume(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("layout", [{}, {"chunks": (2, 2, 2)}, {"chunks": (2, 2, 2), "compression": "gzip"}])
def test_hdf5_data_inside_the_file_still_loads(tmp_path, layout):
    array = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    path = _h5_with_attrs(tmp_path / "ok.h5", data=array, **layout)
    np.testing.assert_array_equal(load_volume(path).array, array)
    compact = tmp_path / "compact.h5"
    with h5py.File(compact, "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        space = h5py.h5s.create_simple((4, 4, 4))
        dsid = h5py.h5d.create(f.id, b"ct", h5py.h5t.NATIVE_FLOAT, space, dcpl=dcpl)
        dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, array)
        f["ct"].attrs["affine"] = np.eye(4)
    np.testing.assert_array_equal(load_volume(compact).array, array)
    assert os.path.getsize(compact) < 4096
