"""Stage-3 training step of the progressive cascade: saved activations and peak memory, with and without
gradient checkpointing.

Why not process RSS (what this benchmark reported before): RSS also counts building the model, the allocator's
cache and the recomputation buffers, and at CPU size those dwarf the activations. Three byte counts per setting
instead, all for one training step (forward, loss, backward, optimizer step) after a warm-up step:

- ``saved_mib``: distinct tensor storages autograd saves for backward during forward + loss (counted by
  ``torch.autograd.graph.saved_tensors_hooks``; checkpointed regions save only their inputs, which go through
  the same hooks). Parameters, buffers (e.g. the back-projection grids) and the batch are excluded: they exist
  whether or not a graph is built. ``saved_network_mib`` / ``saved_loss_mib`` split it at the loss call.
- ``retained_mib``: memory allocated after the loss minus before the forward (everything the graph keeps alive:
  saved tensors, checkpoint inputs, the output). CUDA: ``torch.cuda.memory_allocated``; CPU: the profiler's
  memory events (``profile_memory=True``), summed in time order.
- ``peak_mib``: the highest allocation during forward + backward + optimizer step above the level before the
  forward (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the same profiler timeline). This is the backward
  peak, recomputation included.

The network and loss are the bundle's own (``configs/train.json`` ``network_def`` and ``loss``; ``--tiny`` adds
the ``cpu_tiny.json`` overlay), stage 3, with the stage-3 refiner's checkpointing switched off and on in the
same process on the same weights. CUDA steps run under float16 autocast like the bundle's trainer
(``amp: torch.cuda.is_available()``). Prints a table and writes JSON (``--out``).

    python benchmarks/cascade_memory.py                           # CPU, stage-3 size 64 (X-rays 128^2)
    python benchmarks/cascade_memory.py --size 256 --device cuda   # the paper size on a GPU
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

MIB = 2**20
FOV_MM = (320.0, 320.0, 320.0)  # build_pairs' default dataset: 128 voxels x 2.5 mm


def build_stage3(size: int, tiny: bool, device: str | torch.device):
    """The bundle's network (stage 3, earlier stages frozen), loss and optimizer for stage-3 size ``size``."""
    from monai.bundle import ConfigParser

    configs = [REPO / "bundles" / "progressive_cascade" / "configs" / "train.json"]
    if tiny:
        configs.append(configs[0].with_name("cpu_tiny.json"))
    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    parser["geometry"] = "x2ctgan"
    parser["fov_mm"] = list(FOV_MM)
    parser["stage"] = 3
    parser["volume_sizes"] = [size // 4, size // 2, size]
    parser["xray_size"] = 2 * size
    parser["feature_sizes"] = [size // 2, size, 2 * size]
    parser["gradient_checkpointing"] = [False, False, False]
    parser["perceptual_weights_path"] = None  # no local weights: the loss skips the perceptual term
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def").to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "perceptual loss skipped: no local weights"
        loss_fn = parser.get_parsed_content("loss").to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=float(parser.get_parsed_content("learning_rate")))
    return net, loss_fn, opt


def make_batch(size: int, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    xrays = torch.rand(1, 2, 2 * size, 2 * size, generator=g).to(device)
    target = {
        "ct": torch.rand(1, 1, size, size, size, generator=g).to(device),
        "pa": xrays[:, :1],
        "lateral": xrays[:, 1:],
    }
    return xrays, target


class SavedTensorCounter:
    """Bytes of the distinct storages autograd saves for backward, excluding storages listed in ``exclude``."""

    def __init__(self, exclude: list[torch.Tensor]):
        self.exclude = {self._key(t) for t in exclude}
        self.storages: dict[tuple[str, int], int] = {}

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[str, int]:
        return str(t.device), t.untyped_storage().data_ptr()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            key = self._key(t)
            nbytes = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse, meta)
            return t
        if key not in self.exclude and nbytes:
            self.storages[key] = nbytes
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def cpu_memory_timeline(fn: Callable[[], None], mark: str) -> tuple[int, int]:
    """Run ``fn`` under the profiler; (bytes live when the ``mark`` region ends, peak bytes), both relative to
    the start. ``fn`` must wrap its first phase in ``torch.profiler.record_function(mark)``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    marks = [e for e in events if e.name() == mark]
    if not marks:
        raise RuntimeError(f"profiler recorded no {mark!r} region")
    mark_end = marks[0].end_ns()
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    at_mark = None
    for e in memory:
        if at_mark is None and e.start_ns() > mark_end:
            at_mark = live
        live += e.nbytes()
        peak = max(peak, live)
    return (live if at_mark is None else at_mark), peak


def measure_setting(net, loss_fn, opt, xrays, target, checkpointing: bool, steps: int = 2) -> dict:
    """One stage-3 setting: ``steps`` timed training steps after a warm-up, then one step measured for memory."""
    device = xrays.device
    cuda = device.type == "cuda"
    net.stages[2].refiner.use_checkpoint = bool(checkpointing)
    net.train()

    def forward_loss():
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            out = net(xrays)
            return out, loss_fn(out, target)

    def step():
        opt.zero_grad(set_to_none=True)
        _, loss = forward_loss()
        loss.backward()
        opt.step()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    step()  # warm-up: optimizer state, cuDNN plans
    sync()
    times = []
    for _ in range(max(1, steps)):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)

    exclude = [*net.parameters(), *net.buffers(), *loss_fn.parameters(), *loss_fn.buffers(), xrays]
    exclude += list(target.values())
    counter = SavedTensorCounter(exclude)
    split: dict[str, int] = {}

    def measured_step():
        opt.zero_grad(set_to_none=True)
        with torch.profiler.record_function("forward_loss"):
            with counter.hooks(), torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                out = net(xrays)
                split["network"] = counter.nbytes
                loss = loss_fn(out, target)
            if cuda:
                sync()
                split["retained"] = torch.cuda.memory_allocated(device) - split["start"]
        loss.backward()
        opt.step()
        sync()

    opt.zero_grad(set_to_none=True)  # gradients of the last step are not part of the next one's peak
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        split["start"] = torch.cuda.memory_allocated(device)
        measured_step()
        retained = split["retained"]
        peak = torch.cuda.max_memory_allocated(device) - split["start"]
        how = "torch.cuda.memory_allocated / max_memory_allocated"
    else:
        retained, peak = cpu_memory_timeline(measured_step, "forward_loss")
        how = "torch.profiler memory events (profile_memory=True)"
    return {
        "checkpointing": bool(checkpointing),
        "saved_mib": counter.nbytes / MIB,
        "saved_network_mib": split["network"] / MIB,
        "saved_loss_mib": (counter.nbytes - split["network"]) / MIB,
        "saved_tensors": len(counter.storages),
        "retained_mib": retained / MIB,
        "peak_mib": peak / MIB,
        "step_s": statistics.median(times),
        "timed_steps": len(times),
        "memory_measure": how,
    }


def run(
    size: int = 64, device: str = "cpu", tiny: bool = False, steps: int = 2, threads: int | None = None
) -> dict:
    """Both settings (checkpointing off, then on) on one network; the result dict with the ratios."""
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device)
    net, loss_fn, opt = build_stage3(size, tiny, dev)
    xrays, target = make_batch(size, dev)
    rows = [measure_setting(net, loss_fn, opt, xrays, target, ckpt, steps) for ckpt in (False, True)]
    off, on = rows
    return {
        "benchmark": "cascade_memory",
        "stage3_size": size,
        "xray_size": 2 * size,
        "network": "configs/train.json" + (" + cpu_tiny.json" if tiny else ""),
        "device": str(dev),
        "amp": dev.type == "cuda",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "saved_ratio_off_over_on": off["saved_mib"] / max(on["saved_mib"], 1e-9),
        "saved_network_ratio_off_over_on": off["saved_network_mib"] / max(on["saved_network_mib"], 1e-9),
        "peak_ratio_off_over_on": off["peak_mib"] / max(on["peak_mib"], 1e-9),
        "time_ratio_on_over_off": on["step_s"] / off["step_s"],
    }


def format_table(result: dict) -> str:
    head = (
        f"{'checkpointing':>13} {'saved MiB':>10} {'(network':>9} {'+ loss)':>8} {'retained MiB':>13} "
        f"{'peak MiB':>9} {'step s':>8}"
    )
    lines = [
        f"progressive_cascade stage 3 at {result['stage3_size']}^3 (X-rays {result['xray_size']}^2), "
        f"{result['network']}, {result['device']}, amp={result['amp']}",
        head,
    ]
    for r in result["rows"]:
        lines.append(
            f"{str(r['checkpointing']):>13} {r['saved_mib']:>10.1f} {r['saved_network_mib']:>9.1f} "
            f"{r['saved_loss_mib']:>8.1f} {r['retained_mib']:>13.1f} {r['peak_mib']:>9.1f} {r['step_s']:>8.2f}"
        )
    lines.append(
        f"without / with checkpointing: saved {result['saved_ratio_off_over_on']:.2f}x "
        f"(network {result['saved_network_ratio_off_over_on']:.2f}x), peak {result['peak_ratio_off_over_on']:.2f}x; "
        f"step time with / without {result['time_ratio_on_over_off']:.2f}x"
    )
    return "\n".join(lines)


def main(
    size: int = 64,
    device: str = "cpu",
    tiny: bool = False,
    steps: int = 2,
    threads: int | None = 1,
    out: str = "outputs/benchmarks/cascade_memory.json",
) -> None:
    result = run(size, device, tiny, steps, threads)
    print(format_table(result))
    from common.atomic import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
