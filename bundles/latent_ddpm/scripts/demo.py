"""Demo: train the tiny latent DDPM briefly on a dataset and generate one CT from an X-ray, with previews.

``python -m bundles.latent_ddpm.scripts.demo --output_dir outputs/latent_ddpm_demo [--dataset_dir D]``
Without ``--dataset_dir`` a phantom dataset is made. The VQ-GAN is a randomly initialised tiny one (vqgan_3d_patch's
``network_def`` at cpu_tiny size, read from its config files beside this bundle: the one definition of the
architecture) unless ``--vqgan_checkpoint`` (a vqgan_3d_patch cpu_tiny checkpoint) is given,
so decoded CTs only show the pipeline. Inference runs ``inference.json`` alone (it needs no training config).
"""

from __future__ import annotations

import os

import fire
import torch
from monai.bundle import ConfigParser, run

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(HERE, "configs")
# the codec's bundle, read as data (its network definition), never imported
VQGAN_CONFIGS = os.path.join(os.path.dirname(HERE), "vqgan_3d_patch", "configs")


def random_vqgan(path: str, seed: int = 0, size: str = "cpu_tiny") -> str:
    """A randomly initialised VQ-GAN of vqgan_3d_patch's ``network_def`` at ``size`` (its overlay), saved with its
    record: the latent model reads the architecture from that record, as from a trained codec."""
    from common.atomic import atomic_path
    from common.checkpoint import CheckpointRecord
    from common.errors import InputError

    files = [os.path.join(VQGAN_CONFIGS, "train.json"), os.path.join(VQGAN_CONFIGS, f"{size}.json")]
    if not all(os.path.isfile(f) for f in files):
        raise InputError(VQGAN_CONFIGS, "vqgan_3d_patch's configs are not beside this bundle: pass --vqgan_checkpoint")
    parser = ConfigParser()
    parser.read_config(files)
    torch.manual_seed(seed)
    vqgan = parser.get_parsed_content("network_def")
    record = CheckpointRecord("vqgan_3d_patch", network=vqgan, inputs={"hu_window": "xray2ct"})
    with atomic_path(path) as tmp:
        torch.save({"model": vqgan.state_dict(), "record": record.state_dict()}, tmp)
    return path


def demo(
    output_dir: str, dataset_dir: str | None = None, vqgan_checkpoint: str | None = None, epochs: int = 20
) -> str:
    """Returns the folder holding the generated CT NIfTI, montage PNG and axial GIF."""
    torch.set_num_threads(1)
    os.makedirs(output_dir, exist_ok=True)
    if dataset_dir is None:
        from data_prep.phantom import make_phantom_dataset

        dataset_dir = os.path.join(output_dir, "phantom")
        if not os.path.exists(os.path.join(dataset_dir, "dataset.json")):
            make_phantom_dataset(
                dataset_dir, n_cases=8, size=32, spacing=10.0, geometry="x2ctgan", drr_pixels=32
            )
    if vqgan_checkpoint is None:
        vqgan_checkpoint = random_vqgan(os.path.join(output_dir, "vqgan_random.pt"))
    configs = CONFIGS
    common = dict(
        dataset_dir=dataset_dir, bundle_root=HERE, output_dir=output_dir, ckpt_dir=os.path.join(output_dir, "models"),
        vqgan_checkpoint=vqgan_checkpoint, logging_file=os.path.join(configs, "logging.conf"),
        meta_file=os.path.join(configs, "metadata.json"), max_epochs=epochs, val_interval=5, sampling_steps=10,
    )  # fmt: skip
    cfg = [os.path.join(configs, n) for n in ("train.json", "cpu_tiny.json")]
    run("training", config_file=cfg, **common)
    cfg = [os.path.join(configs, n) for n in ("inference.json", "cpu_tiny.json")]
    run("inference", config_file=cfg, **common)
    return os.path.join(output_dir, "predictions")


if __name__ == "__main__":
    fire.Fire(demo)
