"""Issue 25 item 5: the perx2ct chunk size is timed once per machine and cached; the output does not depend on it."""

from __future__ import annotations

import json

import pytest
import torch
from numerics import network_atol

from bundles.perx2ct.scripts import networks
from bundles.perx2ct.scripts.networks import PerX2CTNet

TINY = dict(volume_size=32, spacing=(12.0,) * 3, image_size=32, feature_res=8, encoder_block="basic",
            encoder_layers=(1, 1), encoder_inplanes=(16, 32), latent_dim=32, pe_multires=6,
            decoder_channels=(16, 32, 32), decoder_res_blocks=1, norm_num_groups=8, attention=False, chunk_size=0)  # fmt: skip


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder and no process memory: every test times afresh."""
    monkeypatch.setenv("XRAY2CT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(networks.CHUNK_ENV, raising=False)
    monkeypatch.setattr(networks, "_TIMED_CHUNKS", {})
    return tmp_path / "cache" / "perx2ct_chunk.json"


FAKE_SECONDS = {1: 3.0, 2: 2.0, 4: 1.5, 8: 1.0, 16: 1.25, 32: 2.0}  # 8 fastest, as on the issue-25 machine


def tiny_net() -> PerX2CTNet:
    torch.manual_seed(0)
    return PerX2CTNet(**TINY).eval()


@pytest.mark.numerics
def test_the_output_does_not_depend_on_the_chunk_in_float32(cache):
    """Chunks only change the batch of the slice decoder (another summation order at most): the float32
    statistical bound of tests/numerics.py, from the decoder's reductions and the output's magnitude."""
    net = tiny_net()
    x = torch.rand(1, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        timed = net.reconstruct(x)  # chunk_size 0: the machine's choice
        outputs = {c: net.reconstruct(x, chunk_size=c) for c in (1, 3, 8, 32)}
    (chunk,) = networks.read_chunk_cache().values()
    assert chunk in networks.CHUNK_CANDIDATES
    atol = network_atol(net, timed, dtype=torch.float32)
    assert 0 < atol < 1e-3 * float(timed.abs().max())  # the bound is far below any logic error
    for c, out in outputs.items():
        torch.testing.assert_close(out, timed, rtol=0, atol=atol, msg=f"chunk {c}")


def test_the_timing_runs_once_per_machine_and_network_then_reads_the_cache(cache, monkeypatch):
    net = tiny_net()
    x = torch.rand(1, 2, 32, 32)
    timed: list[int] = []
    monkeypatch.setattr(networks, "time_chunk_sizes", lambda decode, n, **kw: timed.append(n) or FAKE_SECONDS)
    with torch.inference_mode():
        net.reconstruct(x)
        net.reconstruct(x)
    assert timed == [32]
    stored = json.loads(cache.read_text())
    ((key, entry),) = stored["chunks"].items()
    assert json.loads(key)["volume_size"] == 32 and json.loads(key)["fused"] is True
    assert entry["chunk"] == 8 and entry["volume_seconds"]["8"] == 1.0
    monkeypatch.setattr(networks, "_TIMED_CHUNKS", {})  # a new process: the file answers
    entry["chunk"] = 4
    cache.write_text(json.dumps(stored))
    with torch.inference_mode():
        net.reconstruct(x)
    assert timed == [32] and networks._TIMED_CHUNKS == {key: 4}


@pytest.mark.parametrize("content", ["not json", json.dumps({"chunks": {"k": {"chunk": "8"}}}), json.dumps([1]),
                                     json.dumps({"chunks": {"k": {"chunk": 0}}})])  # fmt: skip
def test_a_malformed_cache_reads_as_empty_and_is_rewritten(cache, content, monkeypatch):
    monkeypatch.setattr(networks, "time_chunk_sizes", lambda decode, n, **kw: FAKE_SECONDS)
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    assert networks.read_chunk_cache() == {}
    with torch.inference_mode():
        tiny_net().reconstruct(torch.rand(1, 2, 32, 32))
    assert list(networks.read_chunk_cache().values()) == [8]


def test_the_environment_and_an_explicit_chunk_override_the_timing(cache, monkeypatch):
    monkeypatch.setattr(networks, "time_chunk_sizes", lambda *a, **k: pytest.fail("timed despite an override"))
    net = tiny_net()
    monkeypatch.setenv(networks.CHUNK_ENV, "5")
    assert net.machine_chunk_size(net.encode(torch.rand(1, 2, 32, 32)), torch.device("cpu")) == 5
    monkeypatch.setenv(networks.CHUNK_ENV, "999")
    assert net.machine_chunk_size(net.encode(torch.rand(1, 2, 32, 32)), torch.device("cpu")) == 32
    monkeypatch.setenv(networks.CHUNK_ENV, "eight")
    with pytest.raises(ValueError, match="XRAY2CT_PERX2CT_CHUNK must be a whole number"):
        net.machine_chunk_size(net.encode(torch.rand(1, 2, 32, 32)), torch.device("cpu"))
    monkeypatch.delenv(networks.CHUNK_ENV)
    with torch.inference_mode():
        net.reconstruct(torch.rand(1, 2, 32, 32), chunk_size=7)  # explicit: no timing
    assert not cache.exists()


def test_the_estimate_counts_the_chunks_a_volume_needs():
    seconds = networks.time_chunk_sizes(lambda c: None, 10, candidates=(1, 4, 16))
    assert sorted(seconds) == [1, 4, 10]  # a candidate above the volume is the whole volume
    calls: list[int] = []
    networks.time_chunk_sizes(calls.append, 10, candidates=(2, 4))
    assert calls == [2, 4] * 3  # a warm-up round, then two timed rounds, interleaved
