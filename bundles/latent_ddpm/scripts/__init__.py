"""Scripts of the latent_ddpm bundle (X-ray conditioned latent diffusion)."""
