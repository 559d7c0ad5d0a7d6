"""The memory measurements behind benchmarks/cascade_memory.py and benchmarks/vqgan_sliding_window.py.

Byte counts, never times: gradient checkpointing must lower the bytes autograd keeps for backward, and the
sliding-window benchmark must visit MONAI's windows and see MONAI's allocations.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from numerics import network_atol

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    """``benchmarks.<name>`` imported by name (spawned worker processes re-import it that way)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module(f"benchmarks.{name}")


@pytest.fixture(scope="module")
def cascade_memory():
    return _load("cascade_memory")


@pytest.fixture(scope="module")
def vqgan_sw():
    return _load("vqgan_sliding_window")


def test_saved_tensor_counter_counts_distinct_storages_and_skips_excluded(cascade_memory):
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    counter = cascade_memory.SavedTensorCounter(exclude=[w])
    with counter.hooks():
        h = x @ w  # saves x (and w, excluded)
        y = torch.tanh(h)  # saves its output y
        (y * y).sum()  # saves y twice: one storage
    assert set(counter.storages.values()) == {32 * 64 * 4}
    assert counter.nbytes == 2 * 32 * 64 * 4


def test_cpu_memory_timeline_sees_retained_and_peak(cascade_memory):
    keep = []

    def fn():
        with torch.profiler.record_function("phase"):
            keep.append(torch.ones(1_000_000))  # 4 MB kept
        tmp = torch.ones(2_000_000)  # 8 MB more, freed
        del tmp

    retained, peak = cascade_memory.cpu_memory_timeline(fn, "phase")
    assert retained == pytest.approx(4_000_000, abs=4096)
    assert peak == pytest.approx(12_000_000, abs=4096)


def test_checkpointing_lowers_saved_activation_bytes(cascade_memory):
    """The stage-3 refiner's gradient checkpointing cuts what autograd keeps (network part) by at least 2x."""
    torch.set_num_threads(1)
    result = cascade_memory.run(size=32, device="cpu", tiny=True, steps=1)
    off, on = result["rows"]
    assert not off["checkpointing"] and on["checkpointing"]
    assert on["saved_network_mib"] * 2 <= off["saved_network_mib"], result
    assert on["saved_mib"] < off["saved_mib"]
    assert on["saved_loss_mib"] == pytest.approx(off["saved_loss_mib"])  # the loss is not checkpointed
    assert on["retained_mib"] < off["retained_mib"]
    assert on["peak_mib"] <= off["peak_mib"]
    assert off["retained_mib"] >= off["saved_mib"] * 0.9  # what the graph keeps alive includes what it saved


def test_windows_are_the_ones_monai_visits(vqgan_sw):
    from monai.inferers import sliding_window_inference

    size, roi, overlap = (50, 37, 29), (32, 16, 16), 0.25
    visited = []

    def predictor(window, coords):
        visited.extend(tuple(c[2:]) for c in coords)
        return window

    sliding_window_inference(torch.zeros(1, 1, *size), roi, 1, predictor, overlap, with_coord=True)
    assert [tuple(s) for s in vqgan_sw.monai_windows(size, roi, overlap)] == visited


def test_allocation_profile_finds_monai_output_and_count_map(vqgan_sw):
    """MONAI's sliding window allocates the output and the count map, one volume each."""
    torch.set_num_threads(1)
    net = vqgan_sw.build_network("tiny")
    volume = torch.rand(1, 1, 64, 48, 40)
    vbytes = volume.numel() * 4

    def reconstruct():
        vqgan_sw.run_method("monai_gaussian", net, volume, (32, 32, 16), 0.25, "cpu", "cpu")

    prof = vqgan_sw.allocation_profile(reconstruct, vbytes)
    whole = [a for a in prof["allocations"] if a["volume_copies_each"] == pytest.approx(1.0)]
    assert sum(a["count"] for a in whole) >= 2, prof
    assert prof["live_peak_volume_copies"] >= 2.0


@pytest.mark.slow
def test_benchmark_reports_copies_and_overhead(vqgan_sw):
    result = vqgan_sw.run(
        volume=(48, 40, 36), roi=(32, 32, 16), network="tiny", methods=["network_only", "monai_gaussian"],
        profile=False, repeats=1,
    )  # fmt: skip
    rows = result["methods"]
    assert set(rows) == {"network_only", "monai_gaussian"}
    assert all("error" not in r for r in rows.values()), rows
    assert rows["network_only"]["blending_overhead"] == 1.0
    assert rows["monai_gaussian"]["blending_overhead"] > 0
    assert rows["monai_gaussian"]["peak_copies"] > 0
    assert result["n_windows"] == len(vqgan_sw.monai_windows((48, 40, 36), (32, 32, 16), 0.25))
    assert "monai_gaussian" in vqgan_sw.format_tables(result)


def test_buffered_blending_matches_the_bundles_path(vqgan_sw):
    """MONAI's buffer_steps variant timed by the suite computes the same volume as the per-window codec path."""
    from common.codec import reconstruct_per_window
    from common.sliding_window import LatentSlidingWindowInferer

    torch.set_num_threads(1)
    net = vqgan_sw.build_network("tiny")
    volume = torch.rand(1, 1, 50, 40, 36, generator=torch.Generator().manual_seed(0))
    fn = vqgan_sw.reconstruction_fn(net)
    with torch.no_grad():
        inferer = LatentSlidingWindowInferer((32, 32, 16), overlap=0.25, mode="gaussian", sw_device="cpu", device="cpu")
        reference = reconstruct_per_window(net, volume, inferer)
        buffered = vqgan_sw.monai_buffered(fn, volume, (32, 32, 16), 0.25, "cpu", "cpu")
    reference = reference.as_subclass(torch.Tensor)  # float32 reorderings of one network (tests/numerics.py)
    torch.testing.assert_close(buffered.as_subclass(torch.Tensor), reference,
                               rtol=0, atol=network_atol(net, reference, torch.float32))  # fmt: skip
