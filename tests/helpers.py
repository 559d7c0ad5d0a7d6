"""Plain helpers several test modules call (fixtures live in conftest.py; these are called, not injected)."""

from __future__ import annotations

import contextlib
import socket
import time
import types

REAL_PAIR = "pneumocystis-pneumonia-2"  # the case of the ``pair`` fixture: a PNG PA + lateral pair of shared data


def save_dicom(ds, target) -> None:
    """Write ``ds`` as a conformant DICOM file on pydicom 2.4 and 3.x alike.

    pydicom 3 renamed ``write_like_original=False`` to ``enforce_file_format=True``; MONAI Label 0.8.5 needs
    pydicom 2.4, so the DICOM tests run on both (bin/compat_check.sh).
    """
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(target, enforce_file_format=True)
    else:
        ds.save_as(target, write_like_original=False)


def free_port() -> int:
    """A TCP port free on loopback now (servers, DDP rendezvous): fixed ports collide when suites run side by side."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_job(client, job_id: str, polls: int = 1200) -> dict:
    """Poll the web app's ``/api/jobs/<id>`` until the job is done or failed (a bounded loop, not a timing assertion)."""
    status = None
    for _ in range(polls):
        status = client.get(f"/api/jobs/{job_id}").json()
        if status["state"] in ("done", "failed"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never finished: {status}")


def check_anatomy_report(report: dict, metric: str = "psnr_xray2ct") -> None:
    """An X-ray -> CT ``metrics_report.json`` has the anatomy metrics, both baselines and their intervals."""
    import math

    for key in ("body_dice", "lung_dice", "lung_volume_error_ml"):
        assert key in report["metrics"], key
    assert set(report["baselines"]) == {"mean_training_ct", "extent_scaled_mean_ct"}
    for name, block in report["baselines"].items():
        for key in (metric, "body_dice", "lung_dice"):
            ci = block["difference_ci"][key]
            assert ci["n_cases"] == report["n_cases"] and ci["n_resamples"] == 2000, (name, key)
            if ci["low"] is not None:  # null only where a metric is undefined (e.g. no lung in a phantom)
                assert ci["low"] <= ci["estimate"] <= ci["high"] and math.isfinite(ci["estimate"]), (name, key)
    assert report["difference_ci"] == report["baselines"]["mean_training_ct"]["difference_ci"]
    assert "same_source" in report and report["same_source_note"]


# DICOM storage classes of the films the tests write
FILM_SOP_CLASSES = {"DX": "1.2.840.10008.5.1.4.1.1.1.1", "CR": "1.2.840.10008.5.1.4.1.1.1"}


def film_dataset(
    path, pixels, photometric: str = "MONOCHROME2", modality: str = "DX", bits_stored: int = 12, **tags
):
    """An uncompressed radiograph DICOM dataset (16 bits allocated, unsigned), not saved yet.

    ``pixels``: (rows, cols), stored as uint16; ``modality`` "DX" (digital X-ray) or "CR"; ``tags`` set last.
    """
    import numpy as np
    import pydicom

    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = FILM_SOP_CLASSES[modality]
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.dataset.FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, (ds.Rows, ds.Columns) = modality, pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelData = np.asarray(pixels).astype(np.uint16).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def write_film(path, pixels, photometric: str = "MONOCHROME2", modality: str = "DX", **tags) -> str:
    """:func:`film_dataset` saved to ``path``; returns the path as a string."""
    save_dicom(film_dataset(path, pixels, photometric, modality, **tags), path)
    return str(path)


def read_until_closed(sock, seconds: float = 30) -> bytes:
    """Everything the peer still sends on ``sock`` before it closes the connection (a reset: closed)."""
    sock.settimeout(seconds)
    received = b""
    with contextlib.suppress(ConnectionError):
        while chunk := sock.recv(4096):
            received += chunk
    return received


@contextlib.contextmanager
def traced():
    """Trace the block's allocations (``tracemalloc``: Python objects and numpy arrays, not torch tensors).

    Yields a namespace whose ``peak`` (bytes, the most held at once) is set when the block ends, also when it
    raises: ``with traced() as memory, pytest.raises(InputError): load(path)`` then ``memory.peak``.
    """
    import tracemalloc

    memory = types.SimpleNamespace(peak=None)
    tracemalloc.start()
    try:
        yield memory
    finally:
        memory.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
