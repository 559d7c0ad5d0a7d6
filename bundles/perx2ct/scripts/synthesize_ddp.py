"""Multi-GPU batch synthesis: one process per GPU, each taking the uids of its rank (``torchrun``).

    torchrun --nproc_per_node 4 -m bundles.perx2ct.scripts.synthesize_ddp --reports_csv ... \\
        --projections_csv ... --image_dir ... --output_dir ...

Ranks share nothing but the output folder (each writes its own ``.part<k>of<n>`` CSVs), so no process
group is needed; RANK / WORLD_SIZE / LOCAL_RANK come from torchrun's environment.
"""

from __future__ import annotations

import inspect
import os

import torch

from bundles.perx2ct.scripts.synthesize import synthesize


def synthesize_rank(**kwargs) -> dict:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    kwargs.setdefault("device", device)
    return synthesize(part_index=rank, total_parts=world, **kwargs)


# fire reads this signature (synthesize's options less the two the rank sets), so --help works
synthesize_rank.__doc__ = synthesize.__doc__
synthesize_rank.__signature__ = inspect.signature(synthesize).replace(  # type: ignore[attr-defined]
    parameters=[
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for name, p in inspect.signature(synthesize).parameters.items()
        if name not in ("part_index", "total_parts") and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
)


if __name__ == "__main__":
    import fire

    fire.Fire(synthesize_rank)
