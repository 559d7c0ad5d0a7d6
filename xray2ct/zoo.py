"""A bundle's weights in the model zoo's form (issue 26): the publication step after training.

Training writes ``models/model.pt`` as ``{"model": state_dict, "record": ...}`` (docs/ARCHITECTURE.md,
"Checkpoint format"). The model zoo's CI (Project-MONAI/model-zoo ``ci/verify_bundle.py`` at dfae206,
``verify_torchscript``) calls ``monai.bundle.ckpt_export`` *without* ``key_in_ckpt``, which loads only a bare
state dict. :func:`export_zoo_weights` rewrites every weights file a bundle's ``large_files.yml`` names into that
form, in place: a bare state dict ``X.pt`` plus its record ``X.record.json`` bound to it by ``weights_sha256``
(:func:`common.checkpoint.export_bare`), and for the X-ray -> CT bundles the stored mean-CT baseline
``X.baseline.pt`` bound by ``baseline_sha256`` (publish all three). Our loaders
(``common.checkpoint.read_checkpoint``) read both forms.

    xray2ct-zoo-export bundles/vqgan_3d_patch      # or python -m xray2ct.zoo bundles/vqgan_3d_patch
"""

from __future__ import annotations

import os

from common.checkpoint import BASELINE_SUFFIX, export_bare
from common.errors import InputError

LARGE_FILES = ("large_files.yml", "large_files.yaml", "large_files.json")  # the zoo's _find_bundle_file suffixes


def weight_files(bundle_root: str | os.PathLike) -> list[str]:
    """Absolute paths of the ``.pt`` files the bundle's ``large_files.yml`` lists (entries ``path``), each
    refused unless it stays under ``<bundle_root>/models``."""
    from monai.bundle import ConfigParser

    root = os.path.abspath(os.fspath(bundle_root))
    listing = next((os.path.join(root, n) for n in LARGE_FILES if os.path.isfile(os.path.join(root, n))), None)
    if listing is None:
        raise InputError(root, f"no {' / '.join(LARGE_FILES)}: not a bundle with published weights")
    try:
        entries = ConfigParser.load_config_file(listing).get("large_files", [])
    except Exception as e:  # yaml / json syntax
        raise InputError(listing, f"unreadable ({type(e).__name__}: {e})") from None
    models = os.path.join(root, "models")
    paths = []
    for entry in entries:
        path = os.path.normpath(os.path.join(root, str(entry.get("path", ""))))
        if os.path.dirname(path) != models:
            raise InputError(listing, f"entry {entry.get('path')!r} is not a file directly under models/")
        if path.endswith(".pt") and not path.endswith(BASELINE_SUFFIX):  # a baseline travels with its weights
            paths.append(path)
    return paths


def export_zoo_weights(bundle_root: str | os.PathLike) -> list[tuple[str, str]]:
    """Rewrite each weights file of ``large_files.yml`` as bare state dict + ``.record.json`` sidecar, in place.

    Idempotent (a file already in the zoo form is re-read through its sidecar and written again). A weights file
    that is missing or has no record raises :class:`InputError` naming it. Returns ``[(weights, sidecar)]``.
    """
    written = []
    for path in weight_files(bundle_root):
        written.append(export_bare(path, path))
    return written


def main(bundle_root: str) -> None:
    """``xray2ct-zoo-export BUNDLE_ROOT``: print each file written."""
    for weights, sidecar in export_zoo_weights(bundle_root):
        print(f"{weights}\n{sidecar}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
