"""Every bundle's full-size network, built from its own configs with no overlay, run without a GPU.

Why: no default (full-size) config had ever run; a user's first GPU run is where a shape or wiring error
would surface. On PyTorch's ``meta`` device a forward and backward pass costs no memory and almost no time
at any size, so the test suite runs them for all six bundles (tests/test_full_size.py) and this script prints
what they cost::

    python benchmarks/full_size.py                 # table + outputs/benchmarks/full_size.json
    python benchmarks/full_size.py --bundles perx2ct --json out.json

Per network: parameters, FLOPs of one training sample's forward + backward (``torch.utils.flop_counter``,
which counts matrix multiplications and convolutions: 2 FLOPs per multiply-add), and the activation memory
autograd saves for the backward pass (the sum of the tensors packed by ``saved_tensors_hooks``, float32,
batch 1, no gradient checkpointing unless the config enables it). The estimate of a training step's peak
memory is weights + gradients + Adam's two moments (4 x parameters x 4 bytes) + saved activations; cuDNN
workspaces and the allocator's fragmentation come on top on a real GPU.

Shapes are the metadata's (``network_data_format``): each output is checked against them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

MIB = 2**20


@dataclass
class Case:
    """One network of one bundle at full size: which config id builds it, what it is fed, what it returns."""

    bundle: str
    network_id: str
    inputs: Callable[[dict], tuple]  # metadata -> positional inputs (meta tensors)
    output_shape: Callable[[dict], tuple[int, ...]] | None  # metadata -> expected output shape
    overrides: dict = field(default_factory=dict)  # config ids a dataset would set (geometry, spacing...)
    pick: Callable = staticmethod(lambda out: out)  # the output to check and back-propagate from
    config: str = "train.json"
    backward: bool = True  # False: an inference pass (no gradients), e.g. PerX2CT's whole-volume decoding


def _shape(meta: dict, key: str, io: str = "inputs") -> list[int]:
    return list(meta["network_data_format"][io][key]["spatial_shape"])


def _channels(meta: dict, key: str, io: str = "inputs") -> int:
    return int(meta["network_data_format"][io][key]["num_channels"])


def _image(meta: dict, key: str = "image", io: str = "inputs") -> torch.Tensor:
    return torch.empty(1, _channels(meta, key, io), *_shape(meta, key, io), device="meta")


def _pred_shape(meta: dict, key: str = "pred") -> tuple[int, ...]:
    return (1, _channels(meta, key, "outputs"), *_shape(meta, key, "outputs"))


PERX2CT_DATASET = {"geometry": "perx2ct", "spacing": [2.5, 2.5, 2.5]}  # the paper's, as build_pairs records it

CASES: list[Case] = [
    Case("vqgan_3d_patch", "network_def", lambda m: (_image(m),), lambda m: _pred_shape(m),
         pick=lambda out: out[0]),
    Case("vqgan_3d_patch", "discriminator_def", lambda m: (_image(m),), None, pick=lambda out: out[-1]),
    Case("pix2pix_phase", "network_def", lambda m: (_image(m),), lambda m: _pred_shape(m)),
    Case("pix2pix_phase", "discriminator_def",
         lambda m: (torch.empty(1, 2, *_shape(m, "image"), device="meta"),), None, pick=lambda out: out[-1]),
    Case("pe_classifier", "network_def", lambda m: (_image(m),), lambda m: (1, _channels(m, "pred", "outputs"))),
    # PerX2CT trains on slices (``slices_per_sample`` per case) and infers whole volumes without gradients
    Case("perx2ct", "network_def", lambda m: (_image(m), torch.zeros(1, 1, dtype=torch.long, device="meta")),
         lambda m: (1, 1, *_shape(m, "pred", "outputs")[:2]), overrides=PERX2CT_DATASET),
    Case("perx2ct", "network_def", lambda m: (_image(m),), lambda m: _pred_shape(m), overrides=PERX2CT_DATASET,
         backward=False, config="inference.json"),
    Case("progressive_cascade", "network_def", lambda m: (_image(m),), lambda m: _pred_shape(m)),
    Case("latent_ddpm", "network_def",
         lambda m: (_image(m), torch.zeros(1, dtype=torch.long, device="meta"), _image(m, "context")),
         lambda m: (1, _channels(m, "image"), *_shape(m, "image"))),
    # latent_ddpm's codec (built from the VQ-GAN checkpoint's record: vqgan_3d_patch's network_def) is frozen:
    # it only encodes (latent extraction) and decodes (sampling) 256x256x128 windows
    Case("vqgan_3d_patch", "network_def",
         lambda m: (torch.empty(1, 1, 256, 256, 128, device="meta"),), lambda m: (1, 1, 256, 256, 128),
         config="inference.json", backward=False),  # inference.json's VQVAE returns the reconstruction alone
]


def metadata(bundle: str) -> dict:
    return json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())


def _parser(case: Case):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / case.bundle / "configs" / case.config)])
    parser["bundle_root"] = str(REPO / "bundles" / case.bundle)
    for key, value in case.overrides.items():
        parser[key] = value
    return parser


def build(case: Case) -> torch.nn.Module:
    """The network of ``case`` from its bundle's config with no overlay, on the meta device."""
    parser = _parser(case)
    try:
        with torch.device("meta"):
            return parser.get_parsed_content(case.network_id)
    except RuntimeError as e:  # a constructor that computes values (the cascade's back-projection grids)
        if "meta" not in str(e.__cause__ or e):
            raise
    parser = _parser(case)  # rebuilt: the failed attempt may have cached partial objects
    with torch.no_grad():
        return parser.get_parsed_content(case.network_id).to("meta")


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)):
        return _first_tensor(out[0])
    raise TypeError(f"no tensor in the output ({type(out).__name__})")


def measure(case: Case) -> dict:
    """One forward + backward pass on the meta device: output shape, parameters, FLOPs, saved activations."""
    meta = metadata(case.bundle)
    net = build(case).train()
    inputs = case.inputs(meta)
    saved = [0]

    def pack(t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter) or t.requires_grad and t.is_leaf:
            return t  # weights are counted once, with the parameters
        saved[0] += t.numel() * t.element_size()
        return t

    counter = FlopCounterMode(display=False)
    grad = torch.enable_grad() if case.backward else torch.no_grad()
    with counter, grad, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = case.pick(net(*inputs))
        out = _first_tensor(out)
        if case.backward:
            out.float().sum().backward()
    params = sum(p.numel() for p in net.parameters())
    missing = [n for n, p in net.named_parameters() if case.backward and p.requires_grad and p.grad is None]
    batch = _parser(case).get("batch_size", 1) if case.backward else 1
    expected = case.output_shape(meta) if case.output_shape else None
    return {
        "bundle": case.bundle,
        "network": case.network_id,
        "class": type(net).__name__,
        "inputs": [list(x.shape) for x in inputs],
        "output": list(out.shape),
        "expected_output": None if expected is None else list(expected),
        "parameters": params,
        "pass": "train" if case.backward else "inference",
        "config": case.config,
        "gflops_per_sample": counter.get_total_flops() / 1e9,
        "saved_activations_mib": saved[0] / MIB,
        "config_batch_size": batch,
        # weights + gradients + Adam moments (float32) + the config batch's saved activations
        "train_step_estimate_mib": (16 * params + batch * saved[0]) / MIB if case.backward else None,
        "parameters_without_grad": missing,
    }


def _real(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if x.dtype in (torch.long, torch.int64, torch.int32):
        return torch.zeros(x.shape, dtype=x.dtype)
    return torch.rand(x.shape, generator=generator)


def cpu_step(case: Case, bf16: bool = True, max_gib: float = 20.0) -> dict:
    """One real full-size training step on the CPU (random inputs at the metadata's shapes, batch 1): forward
    under bf16 autocast (``bf16``), backward, one Adam step; checks that the loss and every gradient are finite.

    Why: the meta device proves shapes, not dtypes or kernels; this runs the real CPU kernels (and autocast's
    dtype paths) at full size. Refuses (ValueError) a step whose estimate exceeds ``max_gib``.
    """
    import time

    estimate = measure(case)
    need = (16 * estimate["parameters"] + estimate["saved_activations_mib"] * MIB) / 2**30
    if need > max_gib:
        raise ValueError(f"{case.bundle} {case.network_id}: a step needs ~{need:.1f} GiB > {max_gib} GiB")
    meta = metadata(case.bundle)
    parser = _parser(case)
    torch.manual_seed(0)
    net = parser.get_parsed_content(case.network_id).train()
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(_real(x, generator) for x in case.inputs(meta))
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-5)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = _first_tensor(case.pick(net(*inputs)))
        # against a random target: a zero-initialised output layer (MONAI's diffusion UNet) must still get gradients
        target = torch.rand(out.shape, generator=generator)
        loss = (out.float() - target).square().mean()
    loss.backward()
    bad = [n for n, p in net.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    moved = sum(int(p.grad is not None and bool(p.grad.abs().sum() > 0)) for p in net.parameters())
    optimizer.step()
    seconds = time.perf_counter() - start
    return {
        "bundle": case.bundle, "network": case.network_id, "bf16_autocast": bf16, "output_dtype": str(out.dtype),
        "loss": float(loss), "finite": bool(torch.isfinite(loss)) and not bad and moved > 0, "nonfinite_grads": bad,
        "parameters_with_nonzero_grad": moved,
        "seconds": seconds, "estimate_gib": need,
    }  # fmt: skip


def format_table(rows: list[dict]) -> str:
    head = ("| bundle | network | pass | parameters | GFLOP per sample | saved activations per sample "
            "| training step at the config's batch |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        step = r["train_step_estimate_mib"]
        step = "-" if step is None else f"{step / 1024:.2f} GiB (batch {r['config_batch_size']})"
        lines.append(
            f"| {r['bundle']} | {r['network']} ({r['class']}) | {r['pass']} | {r['parameters'] / 1e6:.1f} M | "
            f"{r['gflops_per_sample']:,.1f} | {r['saved_activations_mib'] / 1024:.2f} GiB | {step} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", nargs="*", help="bundles to measure (default: all six)")
    parser.add_argument("--cpu_step", action="store_true",
                        help="also run one real full-size training step on the CPU (bf16 autocast) per network")
    parser.add_argument("--json", default=str(REPO / "outputs" / "benchmarks" / "full_size.json"))
    args = parser.parse_args(argv)
    rows = []
    for case in CASES:
        if args.bundles and case.bundle not in args.bundles:
            continue
        with contextlib.suppress(KeyboardInterrupt):
            rows.append(measure(case))
    print(format_table(rows))
    steps = []
    if args.cpu_step:
        for case in CASES:
            if case.backward and (not args.bundles or case.bundle in args.bundles):
                try:
                    steps.append(cpu_step(case))
                except ValueError as e:
                    steps.append({"bundle": case.bundle, "network": case.network_id, "skipped": str(e)})
                step = steps[-1]
                print(f"CPU step {case.bundle} {case.network_id}: " + (step.get("skipped") or
                      f"{step['seconds']:.1f} s, loss {step['loss']:.4g}, output {step['output_dtype']}, "
                      f"finite {step['finite']}"), flush=True)  # fmt: skip
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "cpu_steps": steps, "torch": torch.__version__}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
