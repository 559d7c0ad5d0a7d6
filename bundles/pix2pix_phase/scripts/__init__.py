"""Bundle-specific code of pix2pix_phase: pairing CLI, slice dataset, networks, conditional-GAN trainer."""
