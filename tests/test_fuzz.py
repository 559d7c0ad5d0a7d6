"""Property-based fuzzing of every reader of hostile bytes (issue 23 item 15): mutated files either load or
raise :class:`InputError`, never another exception, never a large allocation; server frames either parse or
raise the wire format's own errors.

Each target starts from a small valid file written here and mutates it the way attacks do: integers in the
header overwritten with boundary values (sizes, offsets, dimensions), bytes flipped, the file truncated, bytes
inserted or deleted. ``hypothesis`` runs derandomized (the same examples on every run, no example database)
with a fixed number of examples per target; the whole module takes under a minute on one core. Run more by
hand with ``XRAY2CT_FUZZ_SCALE=50`` (and ``XRAY2CT_FUZZ_RANDOM=1`` for fresh random examples).

Memory: every example runs under ``tracemalloc`` (numpy arrays are traced) and must stay under
``MAX_TRACED_BYTES``; the seeds are a few KiB, so anything near that means a declared size was trusted.
A crash found by a long run is kept below as an explicit ``@example`` regression case.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import socket
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_dicom, traced
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from bundles.perx2ct.scripts.server import (
    ByteBudget,
    Limits,
    ProtocolError,
    handle_request,
    parse_array_specs,
    read_frame,
)
from common.checkpoint import network_state, read_checkpoint, record_of
from common.errors import InputError
from common.io import load_volume, save_volume
from common.volume import Volume
from common.xray import load_xray

FUZZ_SCALE = float(os.environ.get("XRAY2CT_FUZZ_SCALE", "1"))
MAX_TRACED_BYTES = 64 * 2**20


def fuzz(examples: int) -> settings:
    """``examples`` (times ``XRAY2CT_FUZZ_SCALE``) derandomized examples, no database, no per-example deadline
    (the number of examples bounds the time; one slow example on a busy CI machine is no bug)."""
    return settings(
        max_examples=max(1, int(examples * FUZZ_SCALE)),
        derandomize=not os.environ.get("XRAY2CT_FUZZ_RANDOM"),
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


@pytest.fixture(autouse=True, scope="module")
def quiet_readers():
    """pydicom warns about every odd element it repairs; thousands of lines slow the run and say nothing here."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)

# ----------------------------------------------------------------------------------------------- mutations
BOUNDARY_INTS = [0, 1, 2, 3, 7, 8, 255, 256, 348, 352, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
                 0x80000000, 0xFFFFFFFF, 2**62, 2**63 - 1, 2**64 - 1]  # fmt: skip
BOUNDARY_FLOATS = [0.0, -0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), float("-inf")]
INT_FORMATS = ["<B", "<H", ">H", "<I", ">I", "<Q", ">Q"]


@st.composite
def mutated(draw, seed: bytes, header: int = 512) -> bytes:
    """``seed`` with 1 to 4 mutations, their positions mostly in the first ``header`` bytes."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        n = len(data)
        at = draw(st.one_of(st.integers(0, min(n, header) - 1), st.integers(0, n - 1)))
        kind = draw(st.sampled_from(["int", "float", "byte", "truncate", "insert", "delete"]))
        if kind == "int":
            fmt = draw(st.sampled_from(INT_FORMATS))
            size = struct.calcsize(fmt)
            value = draw(st.sampled_from(BOUNDARY_INTS)) % (1 << (8 * size))
            data[at : at + size] = struct.pack(fmt, value)[: max(0, n - at)]
        elif kind == "float":
            fmt = draw(st.sampled_from(["<f", "<d"]))
            data[at : at + struct.calcsize(fmt)] = struct.pack(fmt, draw(st.sampled_from(BOUNDARY_FLOATS)))
        elif kind == "byte":
            data[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


def loads_or_input_error(load, path: Path) -> None:
    """``load(path)`` returns or raises InputError naming the file; its traced peak stays small."""
    with traced() as memory:
        try:
            load(path)
        except InputError as e:
            assert e.path is None or os.path.basename(e.path) == path.name or path.name in str(e), e
    peak = memory.peak
    assert peak < MAX_TRACED_BYTES, f"{peak / 2**20:.0f} MiB allocated for a {path.stat().st_size}-byte file"


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------------------------- seeds
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def small_volume() -> Volume:
    array = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4) - 1000.0
    return Volume(array, np.diag([1.5, 1.5, 2.5, 1.0]))


def seed_volume(suffix: str) -> tuple[bytes, str | None]:
    """The bytes of a small volume saved as ``suffix``, and its JSON sidecar (``.npy`` only)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(save_volume(small_volume(), Path(d) / f"seed{suffix}"))
        sidecar = path.with_suffix(".json")
        return path.read_bytes(), sidecar.read_text() if sidecar.exists() else None


NIFTI, HDF5 = seed_volume(".nii")[0], seed_volume(".h5")[0]
NPY, NPY_SIDECAR = seed_volume(".npy")


def png_seed(mode: str) -> bytes:
    ramp = np.add.outer(np.arange(16), np.arange(12))
    array = (ramp * 3).astype(np.uint8) if mode == "L" else (ramp * 300).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_seed() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.add.outer(np.arange(16), np.arange(16)) * 7).astype(np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def dicom_bytes(modality: str = "DX", z: float = 0.0, instance: int = 1, rows: int = 8, cols: int = 8) -> bytes:
    """A small uncompressed DICOM (explicit VR little endian): an X-ray, or one CT slice at height ``z``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian

    sop_class = CTImageStorage if modality == "CT" else DigitalXRayImageStorageForPresentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.99.{instance}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.99.1", "1.2.826.0.1.3680043.99.2"
    ds.Modality, ds.PatientID, ds.SeriesNumber, ds.InstanceNumber = modality, "fuzz", 1, instance
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if modality == "CT" else 0
    ds.PixelSpacing = [0.7, 0.7]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024 if modality == "CT" else 0
    if modality == "CT":
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceThickness = 2.0
    dtype = "<i2" if modality == "CT" else "<u2"
    ds.PixelData = (np.add.outer(np.arange(rows), np.arange(cols)) * 37 + instance).astype(dtype).tobytes()
    buffer = io.BytesIO()
    save_dicom(ds, buffer)
    return buffer.getvalue()


def checkpoint_seed() -> bytes:
    net = torch.nn.Linear(3, 2)
    # a record names an allow-listed class (common.checkpoint.NETWORKS); read_checkpoint checks, never builds it
    record = {"format": "xray2ct.checkpoint_record/1", "network_def": {"_target_": "monai.networks.nets.vqvae.VQVAE"}}
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "record": {"json": json.dumps(record)}, "epoch": 3}, buffer)
    return buffer.getvalue()


PNG8, PNG16, JPEG = png_seed("L"), png_seed("I;16"), jpeg_seed()
DICOM_XRAY = dicom_bytes("DX")
DICOM_CT = [dicom_bytes("CT", z=2.0 * k, instance=k + 1) for k in range(3)]
CHECKPOINT = checkpoint_seed()


def with_bytes(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


# Crashes the fuzzer found, kept as regression cases. In a Part 10 file the meta group starts at byte 132:
# (0002,0000) UL with its 2-byte length at 138, then (0002,0001) OB with its 4-byte length at 152.
META_LENGTH_617 = 138, struct.pack("<H", 617)  # BytesLengthException escaped load_xray (a traceback, no file)
OB_LENGTH_1GIB = 152, struct.pack("<I", 1 << 30)  # pydicom's read(1 GiB) allocated 1 GiB for a 1 KB file
GROUP_LENGTH_4GIB = 140, struct.pack("<I", 0xFFFFFFF0)  # check_inflated_size read the meta group: 4 GiB


def test_seeds_are_valid(work):
    """Unmutated, every seed loads: the mutations start from files the readers accept."""
    (work / "v.json").write_text(NPY_SIDECAR)
    for name, data in [("v.nii", NIFTI), ("v.npy", NPY), ("v.h5", HDF5)]:
        assert load_volume(write(work / name, data)).shape == (6, 5, 4)
    for name, data in [("x.png", PNG8), ("x16.png", PNG16), ("x.jpg", JPEG), ("x.dcm", DICOM_XRAY)]:
        assert load_xray(write(work / name, data))[0].ndim == 2
    series = work / "series"
    series.mkdir(exist_ok=True)
    for k, data in enumerate(DICOM_CT):
        write(series / f"{k}.dcm", data)
    assert load_volume(series).shape == (8, 8, 3)
    assert set(read_checkpoint(write(work / "c.pt", CHECKPOINT))) == {"model", "record", "epoch"}


# ----------------------------------------------------------------------------------------------- volumes
# name: (reader, file name, seed file's bytes, the first bytes where most mutations land)
FILE_TARGETS = {
    "nifti": (load_volume, "f.nii", NIFTI, 352),
    "gzip_stream": (load_volume, "g.nii.gz", gzip.compress(NIFTI, mtime=0), 64),
    "hdf5": (load_volume, "f.h5", HDF5, len(HDF5)),
    "nifti_xray": (load_xray, "x.nii", NIFTI, 352),
    "png8_xray": (load_xray, "x.png", PNG8, len(PNG8)),
    "png16_xray": (load_xray, "x16.png", PNG16, len(PNG16)),
    "jpeg_xray": (load_xray, "x.jpg", JPEG, len(JPEG)),
}


@pytest.mark.parametrize("target", sorted(FILE_TARGETS))
@fuzz(100)
@given(data=st.data())
def test_fuzz_file(work, target, data):
    """A reader of one format on its seed file mutated: loads or raises InputError, within the memory bound."""
    load, name, seed, header = FILE_TARGETS[target]
    loads_or_input_error(load, write(work / name, data.draw(mutated(seed, header=header))))


@fuzz(100)
@given(data=mutated(NIFTI, header=352))
def test_fuzz_nifti_gz(work, data):
    loads_or_input_error(load_volume, write(work / "f.nii.gz", gzip.compress(data, mtime=0)))


@fuzz(100)
@given(data=mutated(NPY, header=128))
def test_fuzz_npy(work, data):
    (work / "f.json").write_text(NPY_SIDECAR)
    loads_or_input_error(load_volume, write(work / "f.npy", data))


def load_series_with(work: Path, index: int, data: bytes) -> None:
    folder = work / "ct"
    folder.mkdir(exist_ok=True)
    for k, seed in enumerate(DICOM_CT):
        write(folder / f"{k}.dcm", data if k == index else seed)
    loads_or_input_error(load_volume, folder)


@fuzz(40)
@given(index=st.integers(0, 2), data=st.data())
def test_fuzz_dicom_series(work, index, data):
    """One slice of a three-slice CT series mutated: the series loads or the folder is refused."""
    load_series_with(work, index, data.draw(mutated(DICOM_CT[index], header=len(DICOM_CT[index]))))


@pytest.mark.parametrize(
    "mutation", [META_LENGTH_617, OB_LENGTH_1GIB, GROUP_LENGTH_4GIB], ids=["odd_meta_length", "ob_1gib", "group_4gib"]
)
def test_dicom_series_regressions(work, mutation):
    load_series_with(work, 1, with_bytes(DICOM_CT[1], *mutation))


# ----------------------------------------------------------------------------------------------- X-rays
@fuzz(100)
@example(data=with_bytes(DICOM_XRAY, *META_LENGTH_617))
@example(data=with_bytes(DICOM_XRAY, *OB_LENGTH_1GIB))
@example(data=with_bytes(DICOM_XRAY, *GROUP_LENGTH_4GIB))
@given(data=mutated(DICOM_XRAY, header=len(DICOM_XRAY)))
def test_fuzz_dicom_xray(work, data):
    loads_or_input_error(load_xray, write(work / "x.dcm", data))


# ----------------------------------------------------------------------------------------------- checkpoints
def read_all_of_checkpoint(path: Path) -> None:
    checkpoint = read_checkpoint(path)
    network_state(checkpoint, str(path))
    record_of(checkpoint)


@fuzz(100)
@given(data=mutated(CHECKPOINT, header=len(CHECKPOINT)))
def test_fuzz_checkpoint(work, data):
    loads_or_input_error(read_all_of_checkpoint, write(work / "c.pt", data))


# ----------------------------------------------------------------------------------------------- server frames
def frame_bytes(header: dict, payload: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return b"X2CT" + struct.pack("!IQ", len(text), len(payload)) + text + payload


FRAME_SEED = frame_bytes({"cmd": None, "arrays": [{"name": "frontal", "dtype": "uint16", "shape": [4, 4]}]},
                         bytes(range(32)))  # fmt: skip
FRAME_LIMITS = Limits(max_payload_bytes=1 << 16, max_pixels=256, memory_budget_bytes=1 << 16)


@fuzz(100)
@example(data=frame_bytes({"arrays": [{"name": "x", "dtype": "uint8", "shape": [0, 2**70]}]}))  # item 6
@example(data=frame_bytes({"arrays": [{"name": "cmd", "dtype": "uint8", "shape": [2]}]}, b"\0\0"))  # item 6
@given(data=mutated(FRAME_SEED, header=len(FRAME_SEED)))
def test_fuzz_frame_parser(data):
    """A frame either parses (to a dict the request handler answers) or raises the wire format's errors."""
    reader, writer = socket.socketpair()
    with reader, writer:
        writer.sendall(data)
        writer.shutdown(socket.SHUT_WR)  # the peer hangs up after its bytes: EOF, not a wait
        budget = ByteBudget(FRAME_LIMITS.memory_budget_bytes)
        tracemalloc.start()
        try:
            message, payload = read_frame(reader, FRAME_LIMITS, 1.0, 1.0, None, budget)
        except (ProtocolError, ConnectionError, TimeoutError):
            return
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < MAX_TRACED_BYTES
        budget.release(payload)
        assert budget.used == 0
        reply = handle_request(_NoModel(), message, FRAME_LIMITS.max_pixels)
        assert reply["ok"] is False and isinstance(reply["error"], str)


class _NoModel:
    """Stands in for the predictor: any request that reaches it is refused as bad input."""

    def predict(self, frontal, lateral):
        raise InputError(None, "no model in the fuzz test")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ARRAY_SPEC = st.fixed_dictionaries(
    {"name": st.sampled_from(["frontal", "lateral", "cmd", "arrays", "x"]) | st.text(max_size=4),
     "dtype": st.sampled_from(["uint8", "float32", "object", "<f8", "float64"]) | JSON_VALUES,
     "shape": st.lists(st.integers(-2, 2**64) | JSON_VALUES, max_size=5) | JSON_VALUES}  # fmt: skip
)


@fuzz(100)
@given(
    header=st.dictionaries(st.sampled_from(["cmd", "frontal", "lateral", "x"]), JSON_VALUES, max_size=3),
    specs=st.lists(ARRAY_SPEC, max_size=5) | JSON_VALUES,
    payload=st.integers(0, 2**64 - 1),
)
def test_fuzz_array_specs(header, specs, payload):
    """Any JSON header: the specs are refused with ProtocolError or describe exactly ``payload`` bytes."""
    header = {**header, "arrays": specs}
    try:
        parsed = parse_array_specs(header, payload, Limits())
    except ProtocolError as e:
        assert not e.fatal
        return
    assert sum(int(np.prod(shape, dtype=object)) * dtype.itemsize for _, dtype, shape in parsed) == payload
    request = {k: v for k, v in header.items() if k != "arrays"}
    request.update({name: np.zeros(shape, dtype) for name, dtype, shape in parsed if 0 in shape or payload < 4096})
    reply = handle_request(_NoModel(), request)
    assert reply["ok"] is False or reply.get("pong") is True


@pytest.mark.parametrize("mutation", [OB_LENGTH_1GIB, GROUP_LENGTH_4GIB], ids=["ob_1gib", "group_4gib"])
def test_upload_header_regressions(work, mutation):
    """The web app reads an uploaded DICOM's header the same way: the declared lengths cost nothing."""
    pytest.importorskip("fastapi")
    from webapp.uploads import image_size

    path = write(work / "upload.dcm", with_bytes(DICOM_XRAY, *mutation))
    loads_or_input_error(lambda p: image_size(str(p), "dicom", p.name, 1 << 30), path)
