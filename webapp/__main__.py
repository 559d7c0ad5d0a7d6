"""Start the web demo: ``python -m webapp --checkpoint <ckpt> [--host 127.0.0.1 --port 8000]``.

Several checkpoints, of any X-ray -> CT bundle (perx2ct, progressive_cascade, latent_ddpm; each checkpoint's
record names its bundle): ``--checkpoint a.pt,b.pt`` (or a list); the comparison page runs the same X-rays
through several. ``--pe_checkpoint`` adds a pe_classifier's PE probability to every CT. Networks are built
from the checkpoints' records; config overlays (``--config cpu_tiny``, by name or path) are optional and
refused when they contradict a checkpoint. Binds to localhost unless told otherwise;
requests must name this server in their ``Host`` header: loopback names, the ``--host`` name, and the names
in ``--allowed_hosts`` (e.g. the public name a reverse proxy forwards). See docs/SECURITY.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import fire
import torch

from common.errors import InputError


def as_list(value: str | Sequence[str] | None) -> list[str]:
    """fire hands ``a,b`` or ``[a,b]`` over as one string (unquoted paths are no Python literal): split it."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    return [str(v) for v in value]


def serve(
    checkpoint: str | list[str],
    bundle: str | None = None,
    config: str | list[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    max_upload_mb: float = 20.0,
    workdir: str | None = None,
    threads: int = 1,
    allowed_hosts: str | list[str] | None = None,
    max_pending: int = 4,
    decode_workers: int = 1,
    pe_checkpoint: str | None = None,
    pe_threshold_report: str | None = None,
    vqgan: str | None = None,
    max_sampling_steps: int = 200,
    baseline: bool = True,
    head_timeout: float = 10.0,
    keep_alive_timeout: float = 5.0,
    max_connections: int = 64,
    max_connections_per_client: int = 16,
) -> None:
    """Load the checkpoint(s) and serve the page and API until Ctrl-C.

    ``bundle``: the bundle of checkpoints saved without a record (default perx2ct; with a record it must
    agree). ``vqgan``: latent_ddpm's VQ-GAN (default: the file its record names). ``max_sampling_steps``:
    the most diffusion steps a page may ask for. ``baseline``: score the mean training CT beside each CT.
    Connections (:mod:`webapp.connections`): a request head must arrive within ``head_timeout`` s, an idle
    keep-alive connection closes after ``keep_alive_timeout`` s; at most ``max_connections`` are open, at
    most ``max_connections_per_client`` from one address (0: no per-client cap, e.g. behind a proxy).
    """
    import uvicorn

    from webapp.app import create_app
    from webapp.connections import uvicorn_options
    from webapp.loaders import classifier_refusals, load_classifier, load_models
    from webapp.security import WILDCARDS, allowed_hosts_for

    torch.set_num_threads(int(threads))
    try:
        limits = uvicorn_options(
            float(head_timeout),
            float(keep_alive_timeout),
            int(max_connections),
            int(max_connections_per_client),
        )
    except ValueError as exc:
        sys.exit(f"cannot start the web demo: {exc}")
    try:
        models = load_models(
            as_list(checkpoint), bundle, as_list(config), device, vqgan, int(max_sampling_steps), bool(baseline)
        )
        classifier = load_classifier(pe_checkpoint, device, pe_threshold_report)
        refusals = classifier_refusals(classifier, models)
    except InputError as exc:
        sys.exit(f"cannot start the web demo: {exc}")
    for reason in refusals.values():
        print(f"WARNING: {reason}")
    hosts = sorted(allowed_hosts_for(host, as_list(allowed_hosts)))
    app = create_app(
        models,
        workdir=workdir,
        max_upload_bytes=int(max_upload_mb * 1e6),
        max_pending=max_pending,
        allowed_hosts=hosts,
        decode_workers=decode_workers,
        classifier=classifier,
    )
    if host in WILDCARDS:
        print(f"WARNING: listening on every interface ({host!r}); plain HTTP, no login: see docs/SECURITY.md")
    print(
        f"xray2ct web demo: http://{host}:{port}/  models: {', '.join(models)}"
        + (f"  PE classifier: {classifier.name}" if classifier else "")
        + f"  hosts served: {', '.join(hosts)}"
    )
    uvicorn.run(app, host=host, port=int(port), log_level="info", server_header=False, **limits)


if __name__ == "__main__":
    fire.Fire(serve)
