"""PerX2CT synthesis speed: every way of decoding a volume, in one run, on the same weights and input.

    python benchmarks/perx2ct_synthesis.py [--size cpu|paper] [--device cpu|cuda] [--repeats 5] [--threads 2]
                                           [--compile False] [--server_requests 5] [--chunk 0] [--out PATH]

Variants (each a whole volume from one PA + lateral pair; times are medians of ``repeats``, interleaved
round-robin so that load from other processes hits every variant alike). Both wall time and this
process's CPU time are recorded: on shared cores the wall time of a variant swings with the other
users' load, its CPU time much less (with ``--threads 1`` it is the compute cost itself), so the ratios
are computed from CPU time and both are printed:

* ``original``: the released repository's loop, one full forward (encoder + sampling + decoder) per slice.
* ``slice_loop``: our slice-by-slice loop, encoder once, one decoder call per slice (main before issue 16).
* ``batched``: encoder once, 64 slices per decoder call (main before issue 16).
* ``fused``: encoder once, the decoder's first convolution applied to the feature maps before sampling
  (``PerX2CTNet.project_features``), chunk chosen for the machine (``--chunk 0``: the one-shot timing of
  ``PerX2CTNet.machine_chunk_size``, cached per machine; ``auto_chunk_size``'s cache-size guess is
  reported beside it), inference_mode.
* ``fused_cl``: ``fused`` with channels_last weights and activations (the API's default).
* ``fused_cl_bf16``: ``fused_cl`` under CPU bfloat16 autocast: reported, and flagged inexact when its
  max abs difference to ``original`` exceeds 1e-4.
* ``compiled`` (``--compile True``): ``fused_cl`` with ``torch.compile`` on the decoder tail; its compile time
  is reported separately.

Every variant's output is compared with ``original`` (max abs difference, target < 1e-4). Then a chunk-size
sweep of ``fused_cl`` (what the timed choice should match), a profile of the top operators of
``slice_loop`` and ``fused_cl``, and a server on 127.0.0.1 answering sequential clients. ``--size paper`` is
the paper's 128^3 network (a GPU size; AMP on CUDA).
"""

from __future__ import annotations

import contextlib
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
from bundles.perx2ct.scripts.networks import PerX2CTNet, auto_chunk_size
from bundles.perx2ct.scripts.server import PerX2CTClient, serve
from common.atomic import atomic_write_text

SIZES = {
    # the paper's encoder (ResNet-101 stem..layer2, 512 channels) with a slim decoder, 64^3 output
    "cpu": dict(
        volume_size=64, spacing=(6.0,) * 3, image_size=64, feature_res=16, decoder_channels=(16, 32, 32),
        decoder_res_blocks=1, norm_num_groups=8, attention=False,
    ),
    "paper": dict(volume_size=128, spacing=(2.5,) * 3, image_size=128),
}  # fmt: skip
TOLERANCE = 1e-4


def _profile_top(fn, rows: int = 6) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "op": e.key,
            "share": e.self_cpu_time_total / total,
            "ms": e.self_cpu_time_total / 1e3,
            "calls": e.count,
        }
        for e in events[:rows]
    ]


def main(size: str = "cpu", device: str = "cpu", repeats: int = 5, threads: int = 1, compile: bool = False,
         server_requests: int = 5, chunk: int = 0,
         out: str = "outputs/benchmarks/perx2ct_synthesis.json") -> None:  # fmt: skip
    """``chunk`` 0: the fused variants decode in the machine's chunk (timed once, cached); else that many slices."""
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    dev = torch.device(device)
    net = PerX2CTNet(**SIZES[size], chunk_size=64).to(dev).eval()
    cl_net = PerX2CTNet(**SIZES[size], chunk_size=64).to(dev).eval()
    cl_net.load_state_dict(net.state_dict())
    cl_net.to(memory_format=torch.channels_last)
    n = net.image_size
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    amp = torch.autocast("cuda", torch.float16) if dev.type == "cuda" else contextlib.nullcontext()
    x = torch.rand(1, 2, n, n, generator=torch.Generator().manual_seed(1)).to(dev)
    guess = auto_chunk_size(net, dev)
    if int(chunk) > 0:
        auto = min(int(chunk), net.volume_size)
    else:  # what reconstruct(chunk_size=0) uses for the API's network (channels_last, fused)
        with torch.inference_mode(), amp:
            auto = cl_net.machine_chunk_size(cl_net.project_features(cl_net.encode(x)), dev)

    def original():
        """One full forward (both views through the encoder, one slice decoded) per slice."""
        with torch.no_grad(), amp:
            slices = [net(x, torch.tensor([[k]], device=dev)) for k in range(net.volume_size)]
        return torch.cat(slices, dim=1).movedim(1, 1 + net.decode_axis).unsqueeze(1).float()

    def direct(chunk):
        def run():
            with torch.no_grad(), amp:
                return net.reconstruct(x, chunk_size=chunk, fused=False).float()

        return run

    def fused(model, chunk, bf16=False):
        def run():
            autocast = torch.autocast("cpu", torch.bfloat16) if bf16 else amp
            with torch.inference_mode(), autocast:
                return model.reconstruct(x, chunk_size=chunk, fused=True).float()

        return run

    variants = {
        "original": original,
        "slice_loop": direct(1),
        "batched": direct(64),
        "fused": fused(net, auto),
        "fused_cl": fused(cl_net, auto),
    }
    if dev.type == "cpu":
        variants["fused_cl_bf16"] = fused(cl_net, auto, bf16=True)
    compile_s = None
    if compile:
        compiled_net = PerX2CTNet(**SIZES[size], chunk_size=64).to(dev).eval()
        compiled_net.load_state_dict(net.state_dict())
        compiled_net.to(memory_format=torch.channels_last)
        tail = torch.nn.Sequential(*list(compiled_net.decoder.blocks[1:]))
        compiled_tail = torch.compile(tail, dynamic=False)
        compiled_net.decoder.blocks = torch.nn.ModuleList([compiled_net.decoder.blocks[0], compiled_tail])
        t = time.perf_counter()
        fused(compiled_net, auto)()
        compile_s = time.perf_counter() - t
        variants["compiled"] = fused(compiled_net, auto)

    outputs = {name: fn().cpu() for name, fn in variants.items()}  # warm-up + outputs
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(int(repeats)):  # interleaved, so background load affects all variants alike
        for name, fn in variants.items():
            sync()
            t, c = time.perf_counter(), time.process_time()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
            cpu_times[name].append(time.process_time() - c)
    ref = outputs["original"]
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) for k, v in cpu_times.items()}
    rows = []
    for name in variants:
        diff = float((outputs[name] - ref).abs().max())
        rows.append({
            "variant": name, "median_s": med[name], "min_s": min(times[name]), "max_s": max(times[name]),
            "spread": (max(times[name]) - min(times[name])) / med[name],
            "cpu_median_s": cpu[name], "cpu_spread": (max(cpu_times[name]) - min(cpu_times[name])) / cpu[name],
            "speedup_vs_original": cpu["original"] / cpu[name], "speedup_vs_slice_loop": cpu["slice_loop"] / cpu[name],
            "wall_speedup_vs_original": med["original"] / med[name],
            "wall_speedup_vs_slice_loop": med["slice_loop"] / med[name],
            "max_abs_diff_vs_original": diff, "exact": diff < TOLERANCE,
            "chunk": {"original": 1, "slice_loop": 1, "batched": 64}.get(name, auto),
        })  # fmt: skip

    sweep = {}
    for size_ in sorted({1, 2, 4, 8, 16, 32, 64, auto, guess} & set(range(1, net.volume_size + 1))):
        run = fused(cl_net, size_)
        run()
        ts = []
        for _ in range(max(2, int(repeats) // 2)):
            t = time.process_time() if dev.type == "cpu" else time.perf_counter()
            run()
            sync()
            ts.append((time.process_time() if dev.type == "cpu" else time.perf_counter()) - t)
        sweep[size_] = statistics.median(ts)
    profiles = {}
    if dev.type == "cpu":
        profiles = {
            "slice_loop": _profile_top(variants["slice_loop"]),
            "fused_cl": _profile_top(variants["fused_cl"]),
        }

    server = _server_round_trips(cl_net, dev, n, int(server_requests))
    result = {
        "size": size, "device": str(dev), "threads": int(threads), "repeats": int(repeats),
        "volume_shape": [net.volume_size] * 3, "auto_chunk": auto, "cache_size_guess_chunk": guess,
        "chunk_source": "--chunk" if int(chunk) > 0 else "timed (machine_chunk_size)", "tolerance": TOLERANCE,
        "variants": rows, "compile_s": compile_s, "chunk_sweep_s": sweep, "profile_top_ops": profiles,
        **server,
    }  # fmt: skip

    width = max(len(r["variant"]) for r in rows)
    print(f"PerX2CT synthesis, {'x'.join(map(str, result['volume_shape']))} on {dev}, {threads} threads, "
          f"median of {repeats} (interleaved), chunk {auto} ({result['chunk_source']}; cache-size guess {guess})")  # fmt: skip
    print(f"{'variant':<{width}}  {'cpu s':>7} {'spread':>6}  {'wall s':>7} {'spread':>6}  {'vs original':>11}"
          f"  {'vs slice loop':>13}  {'max|diff|':>9}  exact   (ratios: CPU time; wall-time ratios in the JSON)")  # fmt: skip
    for r in rows:
        print(f"{r['variant']:<{width}}  {r['cpu_median_s']:7.3f} {r['cpu_spread']:6.0%}  {r['median_s']:7.3f} {r['spread']:6.0%}"
              f"  {r['speedup_vs_original']:10.1f}x  {r['speedup_vs_slice_loop']:12.2f}x  {r['max_abs_diff_vs_original']:9.1e}"
              f"  {'yes' if r['exact'] else 'NO'}")  # fmt: skip
    if compile_s is not None:
        print(f"torch.compile of the decoder tail: {compile_s:.1f} s once")
    print("chunk sweep (fused_cl, CPU s): " + ", ".join(f"{k}: {v:.3f}" for k, v in sweep.items()))
    for name, top in profiles.items():
        print(f"top ops {name}: " + ", ".join(f"{t['op']} {t['share']:.0%}" for t in top[:4]))
    if result["server_requests"]:
        print(f"server round trip (median) {result['server_latency_s_median']:.3f} s, "
              f"throughput {result['server_throughput_per_s']:.2f} volumes/s")  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def _server_round_trips(net: PerX2CTNet, dev: torch.device, n: int, requests: int) -> dict:
    """A server on 127.0.0.1 (the API's default path) answering ``requests`` sequential clients.

    ``requests`` 0 skips the server (no latency to report: the figures are None)."""
    if requests < 0:
        raise ValueError(f"server_requests must be >= 0, got {requests}")
    if requests == 0:
        return {
            "server_latency_s_median": None,
            "server_latency_s_max": None,
            "server_throughput_per_s": None,
            "server_requests": 0,
        }
    api = PerX2CTInference(net, device=dev, amp=True)
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
    for _ in range(requests):  # sequential clients, one request each (connect + auth included)
        t = time.perf_counter()
        with PerX2CTClient(port=port, authkey=key) as client:
            client.reconstruct(pa, lat)
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    with PerX2CTClient(port=port, authkey=key) as client:
        client.shutdown()
    thread.join(30)
    return {
        "server_latency_s_median": statistics.median(latencies),
        "server_latency_s_max": max(latencies),
        "server_throughput_per_s": len(latencies) / wall,
        "server_requests": len(latencies),
    }


if __name__ == "__main__":
    fire.Fire(main)
