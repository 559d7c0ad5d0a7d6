"""PerX2CT synthesis speed: batched chunks of slices vs the original slice-by-slice loop, and the server.

    python benchmarks/perx2ct_synthesis.py [--size cpu|paper] [--device cpu|cuda] [--repeats 3] [--out PATH]

Same weights, same input, one run: whole-volume reconstruction with ``chunk_size`` slices per decoder call
against ``chunk_size=1`` (one Python step per slice, as github.com/dek924/PerX2CT does); the outputs are
compared (max abs difference). Then a server on 127.0.0.1 answers sequential clients (round trip latency,
throughput). ``--size paper`` is the 128^3 network of the paper (GPU; AMP on CUDA).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import threading
import time

import fire
import numpy as np
import torch

from bundles.perx2ct.scripts.inference import PerX2CTInference
from bundles.perx2ct.scripts.networks import PerX2CTNet
from bundles.perx2ct.scripts.server import PerX2CTClient, serve
from common.atomic import atomic_write_text

SIZES = {
    # the paper's encoder (ResNet-101 stem..layer2, 512 channels) with a slim decoder, 64^3 output
    "cpu": dict(
        volume_size=64, spacing=(6.0,) * 3, image_size=64, feature_res=16, decoder_channels=(16, 32, 32),
        decoder_res_blocks=1, norm_num_groups=8, attention=False,
    ),
    "paper": dict(volume_size=128, spacing=(2.5,) * 3, image_size=128, attention=False),
}  # fmt: skip


def _time(fn, repeats: int, sync) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return times


def main(size: str = "cpu", device: str = "cpu", repeats: int = 3, chunk_size: int = 64,
         server_requests: int = 5, threads: int = 1, out: str = "outputs/benchmarks/perx2ct_synthesis.json") -> None:  # fmt: skip
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    net = PerX2CTNet(**SIZES[size], chunk_size=chunk_size)
    api = PerX2CTInference(net, device=device, amp=True)
    n = net.image_size
    x = torch.rand(1, 2, n, n)
    sync = torch.cuda.synchronize if api.device.type == "cuda" else (lambda: None)

    net = api.net

    @torch.no_grad()
    def naive() -> torch.Tensor:
        """The original repository's loop: one full forward (both encoders + one slice) per slice."""
        xd = x.to(api.device)
        with api._autocast():
            slices = [net(xd, torch.tensor([[k]], device=api.device)) for k in range(net.volume_size)]
        return torch.cat(slices, dim=1).movedim(1, 1 + net.decode_axis).unsqueeze(1).float().clamp(0, 1).cpu()

    batched = _time(lambda: api.predict_tensor(x, chunk_size=chunk_size), repeats, sync)
    single = _time(lambda: api.predict_tensor(x, chunk_size=1), repeats, sync)
    naive_t = _time(naive, max(1, repeats - 1), sync)
    ref = api.predict_tensor(x, chunk_size=chunk_size)
    diff = float((ref - api.predict_tensor(x, chunk_size=1)).abs().max())
    diff_naive = float((ref - naive()).abs().max())
    t_b, t_s, t_n = statistics.median(batched), statistics.median(single), statistics.median(naive_t)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready, key = threading.Event(), "benchmark"
    thread = threading.Thread(target=serve, args=(api, "127.0.0.1", port, key, ready), daemon=True)
    thread.start()
    ready.wait(30)
    rng = np.random.default_rng(0)
    pa, lat = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    latencies = []
    t0 = time.perf_counter()
    for _ in range(int(server_requests)):  # sequential clients, one request each (connect + auth included)
        t = time.perf_counter()
        with PerX2CTClient(port=port, authkey=key) as client:
            client.reconstruct(pa, lat)
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    with PerX2CTClient(port=port, authkey=key) as client:
        client.shutdown()
    thread.join(30)

    result = {
        "size": size,
        "device": str(api.device),
        "amp": api.amp,
        "threads": int(threads),
        "volume_shape": [net.volume_size] * 3,
        "chunk_size": chunk_size,
        "batched_s": t_b,
        "slice_by_slice_s": t_s,
        "naive_per_slice_forward_s": t_n,
        "speedup_vs_slice_by_slice": t_s / t_b,
        "speedup_vs_naive": t_n / t_b,
        "max_abs_diff": diff,
        "max_abs_diff_naive": diff_naive,
        "volumes_per_hour_batched": 3600.0 / t_b,
        "volumes_per_hour_slice_by_slice": 3600.0 / t_s,
        "volumes_per_hour_naive": 3600.0 / t_n,
        "server_latency_s_median": statistics.median(latencies),
        "server_latency_s_max": max(latencies),
        "server_throughput_per_s": len(latencies) / wall,
        "server_requests": len(latencies),
    }
    rows = [
        ("volume", "x".join(map(str, result["volume_shape"])) + f" on {result['device']}"),
        (f"batched ({chunk_size} slices/call)", f"{t_b:.3f} s"),
        ("slice by slice (encode once)", f"{t_s:.3f} s"),
        ("naive: full forward per slice (seed)", f"{t_n:.3f} s"),
        ("speedup vs slice by slice", f"{result['speedup_vs_slice_by_slice']:.1f}x"),
        ("speedup vs naive", f"{result['speedup_vs_naive']:.1f}x"),
        ("max |batched - slice|, |batched - naive|", f"{diff:.1e}, {diff_naive:.1e}"),
        ("volumes/hour (batched)", f"{result['volumes_per_hour_batched']:.0f}"),
        ("server round trip (median)", f"{result['server_latency_s_median']:.3f} s"),
        ("server throughput", f"{result['server_throughput_per_s']:.2f} volumes/s"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    fire.Fire(main)
