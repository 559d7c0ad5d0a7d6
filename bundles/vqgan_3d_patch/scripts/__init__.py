"""Code specific to the vqgan_3d_patch bundle (network variants, trainer, codec, codebook metrics)."""
