"""A randomly initialised bundle checkpoint, to try the web app (and test it) without trained weights.

    python -m webapp.demo_checkpoint /tmp/perx2ct_random.pt      # then: python -m webapp --checkpoint
                                                                  #   /tmp/perx2ct_random.pt --config cpu_tiny

The network is built from the bundle's ``inference.json`` plus an overlay (default ``cpu_tiny``) and saved
with its record (:mod:`common.checkpoint`), so :func:`webapp.loaders.load_models` rebuilds exactly this
architecture with or without the overlay. Its output is noise: this only exercises the plumbing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import fire
import torch

from common.atomic import atomic_path
from webapp.loaders import config_paths


def make_random_checkpoint(
    path: str,
    bundle: str = "perx2ct",
    config: str = "cpu_tiny",
    spacing: Sequence[float] = (10.0, 10.0, 10.0),
    geometry: str = "perx2ct",
    seed: int = 0,
) -> str:
    """Write ``{"model", "record"}`` of a seeded random network of ``bundle`` to ``path`` (atomically)."""
    from monai.bundle import ConfigParser

    from common.checkpoint import CheckpointRecord
    from common.drr import get_geometry

    parser = ConfigParser()
    parser.read_config(config_paths(bundle, [config]))
    parser["spacing"] = [float(s) for s in spacing]
    size = int(parser["image_size"])
    preset = get_geometry(geometry)
    parser["geometry"] = {**preset.as_dict(), "detector_pixels": [size, size]}
    torch.manual_seed(seed)
    network = parser.get_parsed_content("network_def", instantiate=True)
    inputs = {"image_size": size, "spacing": parser["spacing"], "geometry": parser["geometry"],
              "hu_window": parser.get("hu_window", "xray2ct"), "weights": "random (webapp.demo_checkpoint)"}  # fmt: skip
    record = CheckpointRecord(bundle, network=network, inputs=inputs)
    with atomic_path(path) as tmp:
        torch.save({"model": network.state_dict(), "record": record.state_dict()}, tmp)
    return os.fspath(path)


if __name__ == "__main__":
    fire.Fire(make_random_checkpoint)
